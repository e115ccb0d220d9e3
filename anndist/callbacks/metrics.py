"""MetricsCallback: the run's global metrics as records, written on rank 0 by a subclass.

Each rank adds its micro-batch losses, weighted by batch size, into a tensor on its device: no
sync, no collective. Every ``log_interval`` optimizer steps (the same step on every rank, since
steps advance in lockstep) one all-reduce of ``[loss sum, samples]`` yields the loss averaged over
the interval and over all ranks, and the whole job's samples/s. No other step starts a collective.
The all-reduce is asynchronous: the training thread never waits for it, and the record is written
at the first later step that finds it complete (at the latest at the epoch's end), so a logging
step is no extra synchronisation point between ranks, nor a GPU sync.
The interval restarts at each epoch, and the time of an evaluation inside an epoch (step mode) is
taken out of its interval, so an evaluation never counts as training time. The same all-reduce
carries the interval's items (``num_items`` of the loss step, else samples): tokens/s costs nothing
more. Learning rates and the gradient norm are read on the host, where the optimizer step left them.

Subclasses implement ``write(record)`` (and optionally ``open``/``close``); they run on rank 0 only.
"""
from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Any

import torch

from ..dist import collectives
from ..step.train_state import add_weighted
from .base import Callback

if TYPE_CHECKING:
    from ..trainer import Trainer

EPOCH_KEYS = ("train_loss", "val_loss", "val_accuracy")
EVAL_CONTEXT = ("when", "epoch", "global_step")  # on_evaluate_end's context keys: the record has its own


class MetricsCallback(Callback):
    """Produces ``start``, ``step``, ``epoch`` and ``eval`` records; ``write`` receives them on rank 0.

    Every record has ``kind``, ``time`` (Unix seconds), ``epoch`` and ``step`` (optimizer steps so
    far); every value in a record is a scalar. ``step`` records add ``loss``, ``lr`` (the first
    parameter group's), ``lr_group1``, ``lr_group2``, ... (the other groups', only when there are
    several), ``grad_norm`` (the logging step's gradient norm before clipping, only with
    ``max_grad_norm``), ``samples_per_s`` and, once the loss step gives ``num_items``,
    ``items_per_s`` (tokens/s). ``epoch`` records add the epoch's logs (``train_loss``, ``val_loss``,
    ``val_accuracy``, ``epoch_time``); ``eval`` records add the metrics of an evaluation in step mode
    (``fit(eval_every_n_steps=N)``, at ``step`` = the global step) or of ``trainer.evaluate`` outside
    ``fit``; ``start`` adds ``world_size``. With the loss-spike guard on, a ``spike`` record follows
    each step it skipped or rolled back, with the guard's event (``action`` ``"skip"`` or ``"rollback"``,
    the skipped step's ``epoch``, ``first_batch``, ``last_batch``, the watched ``value``, ...).
    """

    def __init__(self, log_interval: int = 10) -> None:
        if isinstance(log_interval, bool) or not isinstance(log_interval, int) or log_interval < 1:
            raise ValueError(f"log_interval={log_interval!r} must be an int >= 1 (optimizer steps between records)")
        self.log_interval = log_interval
        self.writes = False  # decided once per fit: rank 0 writes, the others only reduce
        self._in_fit = False
        self._loss_sum: torch.Tensor | None = None
        self._items: Any = 0  # the loss's weights: num_items when the loss step gives them, else samples
        self._samples = 0
        self._counts_items = False  # the loss step gives num_items (a micro-batch's items != its samples)
        self._eval_started: float | None = None
        self._reductions: collections.deque[_Reduction] = collections.deque()  # started, not yet written
        self._since = time.perf_counter()
        self._spikes_seen = 0  # the spike guard's events already written

    # ---------------------------------------------------------------- for subclasses
    def open(self, trainer: "Trainer") -> None:
        """Called on rank 0 before the records of a ``fit`` (or of an ``evaluate`` outside fit)."""

    def write(self, record: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement write(record)")

    def close(self) -> None:
        """Called on rank 0 after those records."""

    # ---------------------------------------------------------------- hooks
    def on_train_begin(self, trainer: "Trainer", logs: dict | None = None) -> None:
        self._reductions.clear()
        self.writes, self._in_fit = trainer.is_main_process, True
        guard = _spike_guard(trainer)
        self._spikes_seen = len(guard.events) if guard is not None else 0  # those of a resumed run are written
        if self.writes:
            self.open(trainer)
        self._emit(trainer, "start", world_size=trainer.world_size)

    def on_epoch_begin(self, epoch: int, trainer: "Trainer", logs: dict | None = None) -> None:
        self._restart_interval()

    def on_batch_end(self, batch_idx: int, trainer: "Trainer", logs: dict | None = None) -> None:
        loss, n = logs["loss"], logs["batch_size"]
        if self._loss_sum is None or self._loss_sum.device != loss.device:
            self._loss_sum = torch.zeros((), dtype=torch.float64, device=loss.device)
        items = logs.get("num_items", n)
        add_weighted(self._loss_sum, loss, items)  # stays on the device: no sync
        self._items = self._items + items
        if not self._counts_items and (isinstance(items, torch.Tensor) or items != n):
            self._counts_items = True
        self._samples += n
        if self._reductions and self._reductions[0].ready():
            self._write_reductions(wait=False)
        if logs["stepped"] and trainer.global_step % self.log_interval == 0:
            self._start_reduction(trainer)
        elif logs["ends_window"] and not logs["stepped"] and _spike_guard(trainer) is not None:
            self._write_spikes(trainer, _spike_guard(trainer).events)

    def on_epoch_end(self, epoch: int, trainer: "Trainer", logs: dict | None = None) -> None:
        self._write_reductions(wait=True)  # the epoch's step records come before its epoch record
        logs = logs or {}
        ordered = [key for key in EPOCH_KEYS if key in logs] + sorted(k for k in logs if k not in EPOCH_KEYS)
        self._emit(trainer, "epoch", **{key: _number(logs[key]) for key in ordered if _is_number(logs[key])})

    def on_evaluate_begin(self, trainer: "Trainer", logs: dict | None = None) -> None:
        self._eval_started = time.perf_counter()

    def on_evaluate_end(self, trainer: "Trainer", logs: dict | None = None) -> None:
        logs = logs or {}
        values = {k: _number(v) for k, v in logs.items() if k not in EVAL_CONTEXT and _is_number(v)}
        if self._in_fit:
            if self._eval_started is not None:  # the evaluation is not training time
                self._since += time.perf_counter() - self._eval_started
            if logs.get("when") == "step":  # step mode; at an epoch end the epoch record carries them
                self._write_reductions(wait=True)  # the steps before it come first
                self._emit(trainer, "eval", **values)
            return
        if trainer.is_main_process:
            self.open(trainer)
            self.write(self._record(trainer, "eval", **values))
            self.close()

    def on_train_end(self, trainer: "Trainer", logs: dict | None = None) -> None:
        self._write_reductions(wait=True)  # a run stopped mid-epoch has no epoch end
        self._end_fit()

    def on_exception(self, exc: BaseException, trainer: "Trainer", logs: dict | None = None) -> None:
        self._reductions.clear()  # a peer may be gone: never wait for a reduction here
        self._end_fit()

    def _end_fit(self) -> None:
        self._in_fit = False
        if self.writes:
            self.close()
            self.writes = False

    # ---------------------------------------------------------------- internals
    def _write_spikes(self, trainer: "Trainer", events: list[dict[str, Any]]) -> None:
        if len(events) > self._spikes_seen:
            self._write_reductions(wait=True)  # the steps before it come first (a rare skipped step waits)
        for event in events[self._spikes_seen:]:
            self._emit(trainer, "spike", **{key: value for key, value in event.items() if key not in ("epoch", "step")},
                       skipped_step=event["step"])
        self._spikes_seen = len(events)

    def _start_reduction(self, trainer: "Trainer") -> None:
        device = self._loss_sum.device
        totals = torch.stack([self._loss_sum, torch.as_tensor(self._items, dtype=torch.float64, device=device),
                              torch.tensor(float(self._samples), dtype=torch.float64, device=device)])
        record = self._record(trainer, "step")
        self._reductions.append(_Reduction(totals, record, step_values(trainer), time.perf_counter() - self._since,
                                           self._counts_items, trainer.strategy.data.group))
        self._restart_interval()

    def _write_reductions(self, wait: bool) -> None:
        while self._reductions and (wait or self._reductions[0].ready()):
            record = self._reductions.popleft().result()
            if self.writes:
                self.write(record)

    def _restart_interval(self) -> None:
        if self._loss_sum is not None:
            self._loss_sum.zero_()
        self._items, self._samples = 0, 0
        self._since = time.perf_counter()

    def _emit(self, trainer: "Trainer", kind: str, **values: Any) -> None:
        if self.writes:
            self.write(self._record(trainer, kind, **values))

    @staticmethod
    def _record(trainer: "Trainer", kind: str, **values: Any) -> dict[str, Any]:
        return {"kind": kind, "time": time.time(), "epoch": trainer.epoch, "step": trainer.global_step, **values}


class _Reduction:
    """One interval's ``[loss sum, samples]``, all-reduced asynchronously, read once complete.

    On CUDA the result comes back through a non-blocking copy to pinned host memory ordered after
    the all-reduce, and an event says when it has landed, so reading it never syncs the GPU.
    """

    def __init__(self, totals: torch.Tensor, record: dict[str, Any], values: dict[str, float], elapsed: float,
                 with_items: bool, group: Any = None) -> None:
        self.record, self.values, self.elapsed, self.with_items = record, values, elapsed, with_items
        # every rank is at this same optimizer step; over the ranks that read different data (group)
        self.work = collectives.all_reduce_async(totals, group)
        self.event: torch.cuda.Event | None = None
        self.totals = totals
        if totals.is_cuda:
            if self.work is not None:
                self.work.wait()  # with NCCL the current stream waits for the all-reduce, not the host
            self.totals = totals.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def ready(self) -> bool:
        if self.event is not None:
            return self.event.query()
        return self.work is None or self.work.is_completed()

    def result(self) -> dict[str, Any]:
        """The step record, waiting for the all-reduce if it has not finished."""
        if self.event is not None:
            self.event.synchronize()
        elif self.work is not None:
            self.work.wait()
        loss_sum, items, samples = self.totals.tolist()
        per_s = (lambda count: count / self.elapsed) if self.elapsed > 0 else (lambda count: float("nan"))
        record = {**self.record, "loss": loss_sum / items, **self.values, "samples_per_s": per_s(samples)}
        if self.with_items:
            record["items_per_s"] = per_s(items)
        return record


def step_values(trainer: "Trainer") -> dict[str, float]:
    """A step record's host-side values: ``lr``, ``lr_group<i>`` for the other groups, ``grad_norm``.

    Read where the optimizer step left them: no collective, no GPU sync (the norm is the float that
    clipping already computed, before clipping, identical on every rank).
    """
    groups = trainer.optimizer.param_groups
    values = {"lr": float(groups[0]["lr"])}
    values.update((f"lr_group{i}", float(group["lr"])) for i, group in enumerate(groups) if i > 0)
    if trainer.config.max_grad_norm is not None:
        values["grad_norm"] = float(trainer.last_grad_norm)
    return values


def _spike_guard(trainer: "Trainer") -> Any:
    """The run's loss-spike guard, or None (off, or a trainer-like object without a run state)."""
    return getattr(getattr(trainer, "state", None), "spike_guard", None)


def learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The first parameter group's learning rate (a tensor lr is read as a float)."""
    return float(optimizer.param_groups[0]["lr"])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or (
        isinstance(value, torch.Tensor) and value.numel() == 1)


def _number(value: Any) -> float | int:
    return value.item() if isinstance(value, torch.Tensor) else value
