"""MetricsCallback: the run's global metrics as records, written on rank 0 by a subclass.

Each rank adds its micro-batch losses, weighted by batch size, into a tensor on its device: no
sync, no collective. Every ``log_interval`` optimizer steps (the same step on every rank, since
steps advance in lockstep) one all-reduce of ``[loss sum, samples]`` yields the loss averaged over
the interval and over all ranks, and the whole job's samples/s. No other step has a collective.
The interval restarts at each epoch, so an evaluation never counts as training time.

Subclasses implement ``write(record)`` (and optionally ``open``/``close``); they run on rank 0 only.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from .. import process_group
from .base import Callback

if TYPE_CHECKING:
    from ..trainer import Trainer

EPOCH_KEYS = ("train_loss", "val_loss", "val_accuracy")


class MetricsCallback(Callback):
    """Produces ``start``, ``step``, ``epoch`` and ``eval`` records; ``write`` receives them on rank 0.

    Every record has ``kind``, ``time`` (Unix seconds), ``epoch`` and ``step`` (optimizer steps so
    far). ``step`` records add ``loss``, ``lr`` and ``samples_per_s``; ``epoch`` records add the
    epoch's logs (``train_loss``, ``val_loss``, ``val_accuracy``, ``epoch_time``); ``eval`` records
    (``trainer.evaluate`` outside ``fit``) add the evaluation metrics; ``start`` adds ``world_size``.
    """

    def __init__(self, log_interval: int = 10) -> None:
        if isinstance(log_interval, bool) or not isinstance(log_interval, int) or log_interval < 1:
            raise ValueError(f"log_interval={log_interval!r} must be an int >= 1 (optimizer steps between records)")
        self.log_interval = log_interval
        self.writes = False  # decided once per fit: rank 0 writes, the others only reduce
        self._in_fit = False
        self._loss_sum: torch.Tensor | None = None
        self._samples = 0
        self._since = time.perf_counter()

    # ---------------------------------------------------------------- for subclasses
    def open(self, trainer: "Trainer") -> None:
        """Called on rank 0 before the records of a ``fit`` (or of an ``evaluate`` outside fit)."""

    def write(self, record: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement write(record)")

    def close(self) -> None:
        """Called on rank 0 after those records."""

    # ---------------------------------------------------------------- hooks
    def on_train_begin(self, trainer: "Trainer", logs: dict | None = None) -> None:
        if self.writes:
            self.close()  # a previous fit that raised never reached on_train_end
        self.writes, self._in_fit = trainer.is_main_process, True
        if self.writes:
            self.open(trainer)
        self._emit(trainer, "start", world_size=trainer.world_size)

    def on_epoch_begin(self, epoch: int, trainer: "Trainer", logs: dict | None = None) -> None:
        self._restart_interval()

    def on_batch_end(self, batch_idx: int, trainer: "Trainer", logs: dict | None = None) -> None:
        loss, n = logs["loss"], logs["batch_size"]
        if self._loss_sum is None or self._loss_sum.device != loss.device:
            self._loss_sum = torch.zeros((), dtype=torch.float64, device=loss.device)
        self._loss_sum.add_(loss, alpha=n)  # stays on the device: no sync
        self._samples += n
        if logs["stepped"] and trainer.global_step % self.log_interval == 0:
            self._log_interval(trainer)

    def on_epoch_end(self, epoch: int, trainer: "Trainer", logs: dict | None = None) -> None:
        logs = logs or {}
        ordered = [key for key in EPOCH_KEYS if key in logs] + sorted(k for k in logs if k not in EPOCH_KEYS)
        self._emit(trainer, "epoch", **{key: _number(logs[key]) for key in ordered if _is_number(logs[key])})

    def on_evaluate_end(self, trainer: "Trainer", logs: dict | None = None) -> None:
        if self._in_fit or not trainer.is_main_process:  # inside fit, the epoch record carries it
            return
        self.open(trainer)
        self.write(self._record(trainer, "eval", **{k: _number(v) for k, v in (logs or {}).items() if _is_number(v)}))
        self.close()

    def on_train_end(self, trainer: "Trainer", logs: dict | None = None) -> None:
        self._in_fit = False
        if self.writes:
            self.close()
            self.writes = False

    # ---------------------------------------------------------------- internals
    def _log_interval(self, trainer: "Trainer") -> None:
        elapsed = time.perf_counter() - self._since
        totals = torch.stack([self._loss_sum, torch.tensor(float(self._samples), dtype=torch.float64,
                                                           device=self._loss_sum.device)])
        process_group.all_reduce(totals)  # every rank is at this same optimizer step
        loss_sum, samples = totals.tolist()
        self._emit(trainer, "step", loss=loss_sum / samples, lr=learning_rate(trainer.optimizer),
                   samples_per_s=samples / elapsed if elapsed > 0 else float("nan"))
        self._restart_interval()

    def _restart_interval(self) -> None:
        if self._loss_sum is not None:
            self._loss_sum.zero_()
        self._samples = 0
        self._since = time.perf_counter()

    def _emit(self, trainer: "Trainer", kind: str, **values: Any) -> None:
        if self.writes:
            self.write(self._record(trainer, kind, **values))

    @staticmethod
    def _record(trainer: "Trainer", kind: str, **values: Any) -> dict[str, Any]:
        return {"kind": kind, "time": time.time(), "epoch": trainer.epoch, "step": trainer.global_step, **values}


def learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The first parameter group's learning rate (a tensor lr is read as a float)."""
    return float(optimizer.param_groups[0]["lr"])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or (
        isinstance(value, torch.Tensor) and value.numel() == 1)


def _number(value: Any) -> float | int:
    return value.item() if isinstance(value, torch.Tensor) else value
