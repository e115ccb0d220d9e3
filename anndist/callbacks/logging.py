"""LoggingCallback: one copy of each line (rank 0), with values reduced over all ranks."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..log import get_logger
from .base import Callback

if TYPE_CHECKING:
    from ..trainer import Trainer


class LoggingCallback(Callback):
    """Logs the epoch's global train and val metrics and its time, on rank 0 only."""

    def __init__(self, log_interval: int = 10, log_dir: str | None = None) -> None:
        if isinstance(log_interval, bool) or not isinstance(log_interval, int) or log_interval < 1:
            raise ValueError(f"log_interval={log_interval!r} must be an int >= 1 (optimizer steps between lines)")
        self.log_interval = log_interval
        self.log_dir = log_dir
        self.logger = get_logger()

    def on_train_begin(self, trainer: "Trainer", logs: dict | None = None) -> None:
        self.logger = get_logger(trainer.rank)
        self.logger.info("training on %d process(es), device %s", trainer.world_size, trainer.device)

    def on_epoch_end(self, epoch: int, trainer: "Trainer", logs: dict | None = None) -> None:
        logs = logs or {}
        parts = [f"epoch {epoch}"] + [f"{key} {logs[key]:.4f}" for key in ("train_loss", "val_loss", "val_accuracy") if key in logs]
        parts.append(f"time {logs.get('epoch_time', float('nan')):.2f}s")
        self.logger.info(" | ".join(parts))
