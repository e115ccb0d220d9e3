"""LoggingCallback: one copy of each line (rank 0), with values reduced over all ranks.

Lines go through Python ``logging`` (the rank-aware ``anndist`` logger), so they print once however
many ranks run. With ``log_dir`` the same records are appended to ``log_dir/metrics.jsonl``; a
requeued or resumed run appends to the same file (``python -m anndist.plot`` draws it). Each
``fit`` ends with one closing line (``summary.py``): time, steps, best metric, where the files went.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .jsonl import JsonlWriter
from .metrics import MetricsCallback
from .summary import run_summary

if TYPE_CHECKING:
    from ..trainer import Trainer

METRICS_FILE = "metrics.jsonl"


class LoggingCallback(MetricsCallback):
    """Every ``log_interval`` optimizer steps: epoch, step, global interval loss, lr, job samples/s.

    At each epoch end: the epoch's global train and val metrics and its time; at the end of ``fit``
    a closing line (time, steps, best monitored metric, checkpoint folder, metrics file). See
    :class:`MetricsCallback` for how the values are reduced (on logging steps only).
    """

    def __init__(self, log_interval: int = 10, log_dir: str | os.PathLike | None = None) -> None:
        super().__init__(log_interval)
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a path (str or os.PathLike) or None, got {type(log_dir).__name__} {log_dir!r}")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.logger = logging.getLogger(__name__)
        self._file: JsonlWriter | None = None

    @property
    def metrics_path(self) -> Path | None:
        return self.log_dir / METRICS_FILE if self.log_dir is not None else None

    def on_train_begin(self, trainer: "Trainer", logs: dict | None = None) -> None:
        self._fit_started, self._first_step = time.perf_counter(), trainer.global_step  # after any resume
        super().on_train_begin(trainer, logs)

    def on_train_end(self, trainer: "Trainer", logs: dict | None = None) -> None:
        super().on_train_end(trainer, logs)
        if trainer.is_main_process:  # the others would build the line for nothing
            elapsed = time.perf_counter() - self._fit_started
            self.logger.info(run_summary(trainer, elapsed, self._first_step, self.metrics_path))

    def open(self, trainer: "Trainer") -> None:
        if self.log_dir is not None:
            self._file = JsonlWriter(self.metrics_path)

    def write(self, record: dict[str, Any]) -> None:
        self.logger.info(format_record(record))
        if self._file is not None:
            self._file.write(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def format_record(record: dict[str, Any]) -> str:
    """The console line for one metrics record."""
    kind = record["kind"]
    if kind == "start":
        return (f"training on {record['world_size']} process(es) from epoch {record['epoch']}, "
                f"step {record['step']}")
    if kind == "step":
        line = (f"epoch {record['epoch']} step {record['step']} | loss {record['loss']:.4f} | "
                f"lr {record['lr']:.3g} | {record['samples_per_s']:.0f} samples/s")
        if "items_per_s" in record:
            line += f" | {record['items_per_s']:.0f} items/s"
        return line + (f" | grad_norm {record['grad_norm']:.3g}" if "grad_norm" in record else "")
    values = {k: v for k, v in record.items() if k not in ("kind", "time", "epoch", "step")}
    epoch_time = values.pop("epoch_time", None)
    parts = [f"epoch {record['epoch']}" if kind == "epoch" else f"evaluate at step {record['step']}"]
    parts += [f"{key} {_fmt(value)}" for key, value in values.items()]
    if epoch_time is not None:
        parts.append(f"time {epoch_time:.2f}s")
    return " | ".join(parts)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
