"""Recording and signalling callbacks that several test files use."""
from __future__ import annotations

import os

from anndist import Callback, MetricsCallback


class Records(MetricsCallback):
    """The metrics records, kept in a list instead of written."""

    def __init__(self, log_interval=2):
        super().__init__(log_interval)
        self.records = []

    def write(self, record):
        self.records.append(record)


class Norms(Callback):
    """The norm the optimizer step measured, per optimizer step."""

    def __init__(self):
        self.norms = {}

    def on_batch_end(self, batch_idx, trainer, logs=None):
        if logs["stepped"]:
            self.norms[trainer.global_step] = trainer._optimizer_step.last_grad_norm


class SignalAt(Callback):
    """Sends ``sig`` to this very process on rank ``rank`` after optimizer step ``step`` (or at the
    end of epoch ``epoch_end``)."""

    def __init__(self, sig: int, step: int | None = None, rank: int = 0, epoch_end: int | None = None) -> None:
        self.sig, self.step, self.rank, self.epoch_end = sig, step, rank, epoch_end

    def on_batch_end(self, batch_idx, trainer, logs=None):
        if trainer.rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)

    def on_epoch_end(self, epoch, trainer, logs=None):
        if trainer.rank == self.rank and epoch == self.epoch_end:
            os.kill(os.getpid(), self.sig)
