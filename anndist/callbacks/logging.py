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

import torch

from .base import Callback
from .jsonl import JsonlWriter
from .metrics import EVAL_CONTEXT, MetricsCallback
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
        close_run(trainer, self.logger, self._fit_started, self._first_step, self.metrics_path)

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


class EpochLogCallback(Callback):
    """What a run prints when no ``LoggingCallback`` is given (``Trainer(log_epochs=False)`` turns it off):
    on rank 0, a line per epoch (per evaluation in step mode) with the epoch's global metrics, and the
    closing line. Epoch and evaluation hooks only: nothing runs per micro-batch, and no collective."""

    def __init__(self) -> None:
        self.logger = logging.getLogger(__name__)

    def on_train_begin(self, trainer: "Trainer", logs: dict | None = None) -> None:
        self._fit_started, self._first_step = time.perf_counter(), trainer.global_step

    def on_epoch_end(self, epoch: int, trainer: "Trainer", logs: dict | None = None) -> None:
        self._line(trainer, "epoch", logs or {})

    def on_evaluate_end(self, trainer: "Trainer", logs: dict | None = None) -> None:
        if (logs or {}).get("when") == "step":
            self._line(trainer, "eval", {k: v for k, v in logs.items() if k not in EVAL_CONTEXT})

    def on_train_end(self, trainer: "Trainer", logs: dict | None = None) -> None:
        close_run(trainer, self.logger, self._fit_started, self._first_step, None)

    def _line(self, trainer: "Trainer", kind: str, values: dict[str, Any]) -> None:
        if trainer.is_main_process:
            numbers = {k: _scalar(v) for k, v in values.items() if _scalar(v) is not None}
            self.logger.info(format_record({"kind": kind, "epoch": trainer.epoch, "step": trainer.global_step,
                                            **numbers}))


def close_run(trainer: "Trainer", logger: logging.Logger, started: float, first_step: int,
              metrics_path: Path | None) -> None:
    """Have the closing line printed (rank 0) once the run is over: after every ``on_train_end`` and a
    preemption's save, so that it is last and says what was written (``summary.py``)."""
    if trainer.is_main_process:  # the others would build the line for nothing
        trainer.callbacks.run_at_end(lambda: logger.info(
            run_summary(trainer, time.perf_counter() - started, first_step, metrics_path)))


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


def _scalar(value: Any) -> float | int | None:
    """A number of the logs as a Python number; None for anything else (a tensor of several values, a string)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
