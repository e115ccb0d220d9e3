"""The run's metrics file: one JSON object per line, appended and flushed line by line.

Appending (never rewriting) is what lets a requeued or resumed run continue the same file, and
flushing each line means a crash loses at most the line being written. A torn last line left by
such a crash is fenced off by a newline on the next open and skipped by the reader.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class JsonlWriter:
    """Appends records to ``path`` (created with its folders), one strict-JSON line each."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._file.tell() > 0 and not _ends_with_newline(self.path):
            self._file.write("\n")  # fence off a line torn by a crash

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(_finite(record), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of ``path`` in order; a line that does not parse (a crash's torn line) is skipped."""
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s:%d is not valid JSON (a line torn by a crash?); skipped", path, number)
    return records


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    # NaN and infinity are not JSON; null keeps the file readable by any parser.
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in record.items()}
