"""TensorBoardCallback: the global metrics as TensorBoard scalars, written by rank 0.

Needs the optional extra ``tensorboard`` (``pip install 'anndist[tensorboard]'``). The values are
those of :class:`MetricsCallback` (reduced over all ranks on logging steps only); the x axis is the
optimizer step, so a resumed run writing a new event file into the same folder continues the curves.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..optional import require
from .metrics import MetricsCallback

if TYPE_CHECKING:
    from ..trainer import Trainer

# step records -> "train/<name>"; epoch records -> "epoch/<name>"; evaluate() outside fit -> "eval/<name>"
_GROUPS = {"step": "train", "epoch": "epoch", "eval": "eval"}
_NOT_SCALARS = ("kind", "time", "epoch", "step")


class TensorBoardCallback(MetricsCallback):
    """Scalars ``train/loss``, ``train/lr``, ``train/samples_per_s`` every ``log_interval`` steps and
    ``epoch/train_loss``, ``epoch/val_loss``, ``epoch/val_accuracy``, ``epoch/epoch_time`` per epoch."""

    def __init__(self, log_dir: str | os.PathLike, log_interval: int = 10) -> None:
        super().__init__(log_interval)
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a path (str or os.PathLike), got {type(log_dir).__name__} {log_dir!r}")
        require("tensorboard", "TensorBoardCallback")  # a one-line error naming the pip command
        from torch.utils.tensorboard import SummaryWriter
        self._summary_writer = SummaryWriter
        self.log_dir = os.fspath(log_dir)
        self.writer: Any = None

    def open(self, trainer: "Trainer") -> None:
        self.writer = self._summary_writer(self.log_dir)

    def write(self, record: dict[str, Any]) -> None:
        group = _GROUPS.get(record["kind"])
        if group is None:
            return
        for name, value in record.items():
            if name not in _NOT_SCALARS and value is not None:
                self.writer.add_scalar(f"{group}/{name}", value, global_step=record["step"], walltime=record["time"])
        if group != "train":
            self.writer.flush()  # an epoch's figures survive a crash or preemption

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
