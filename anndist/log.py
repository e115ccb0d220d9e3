"""Rank-aware logging, decided once: rank 0 prints info, other ranks speak only for warnings.

``get_logger(rank)`` returns the ``anndist`` logger with a handler whose records carry a
``[rank N]`` prefix on ranks other than 0, and a filter that drops their info and debug lines, so
call sites never test the rank themselves.
"""
from __future__ import annotations

import logging
import sys
from typing import IO

_HANDLER_NAME = "anndist-rank-aware"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_prefix = "" if self.rank == 0 else f"[rank {self.rank}] "
        return self.rank == 0 or record.levelno >= logging.WARNING


def get_logger(rank: int = 0) -> logging.Logger:
    """The ``anndist`` logger, configured for ``rank`` (idempotent; respects a user's own handlers)."""
    logger = logging.getLogger("anndist")
    handler = next((h for h in logger.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(rank_prefix)s%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    for old in list(handler.filters):
        handler.removeFilter(old)
    handler.addFilter(_RankFilter(rank))
    return logger


def set_console_stream(stream: IO[str]) -> IO[str] | None:
    """Point the rank-aware console handler at ``stream`` (e.g. above a progress bar); return the old one."""
    handler = next((h for h in logging.getLogger("anndist").handlers if h.get_name() == _HANDLER_NAME), None)
    return handler.setStream(stream) if handler is not None else None
