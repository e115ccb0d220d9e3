"""Rank-aware logging, decided once per process: rank 0 prints info, other ranks only warnings.

The Trainer calls :func:`configure` with its rank when it is built. Modules log through
``logging.getLogger(__name__)`` (children of the ``anndist`` logger), and so can users' callbacks
(``logging.getLogger("anndist.my_callback")``): non-zero ranks are quiet by configuration, and
their warnings carry a ``[rank N]`` prefix, so no call site ever tests the rank.
"""
from __future__ import annotations

import logging
import sys
from typing import IO

ROOT = "anndist"
_HANDLER_NAME = "anndist-rank-aware"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_prefix = "" if self.rank == 0 else f"[rank {self.rank}] "
        return self.rank == 0 or record.levelno >= logging.WARNING


def configure(rank: int) -> logging.Logger:
    """Give the ``anndist`` logger a console handler for ``rank`` (idempotent; keeps a user's handlers)."""
    logger = logging.getLogger(ROOT)
    handler = _handler()
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
    handler = _handler()
    return handler.setStream(stream) if handler is not None else None


def _handler() -> logging.Handler | None:
    return next((h for h in logging.getLogger(ROOT).handlers if h.get_name() == _HANDLER_NAME), None)
