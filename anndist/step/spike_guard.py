"""The loss-spike guard (``Trainer(spike_guard=True)`` or ``spike_guard=SpikeGuard(...)``; off by default).

At every optimizer step the guard compares one global value, the gradient norm (``watch="grad_norm"``,
the default: every rank already has it, from the all-reduced gradients) or the window's loss over
every rank (``watch="loss"``), with running estimates of its mean
and variance (exponential moving averages with ``decay``, after ``warmup`` steps of plain
observation). A value more than ``threshold`` deviations above the mean is a spike, the deviation
taken at least ``min_deviation * |mean|`` (by default a spike is then at least 2.2 times the mean, as
Lightning's relative tolerance of 2 asks 3 times: a flat curve, or the noisier epoch's last, short
step, is not a spike):

- the step is skipped: the gradients are dropped before the optimizer sees them (nothing to roll
  back), the scheduler does not step, ``global_step`` does not advance, and the window's losses stay
  out of the epoch's ``train_loss`` (as a skipped non-finite step's do);
- after ``max_consecutive`` spikes in a row, the weights are bad, not the batch: model, optimizer,
  scheduler and scaler roll back to the newest step checkpoint of the run's folder older than the
  current step, and ``global_step`` with them, while the data goes on after the spikes: the windows
  trained since that checkpoint and the spiking ones are skipped, as PaLM's recipe does by hand.

Every rank decides alike: the value is global. The gradient norm is computed from the all-reduced
gradients (no collective under DDP; FSDP reduces it as clipping does); the loss rides in the item
count's all-reduce in items mode, and otherwise in one all-reduce of two numbers of its own, started
before the window's last backward (on 2 CPU ranks with gloo a round trip of 0.1 to 0.5 ms: hence
the default). What was skipped is in
``events`` (each with its epoch, step, micro-batch range, samples and values), saved with the run's
state, so a resumed run decides exactly as the uninterrupted one, and sent to MetricsCallback
records of kind ``"spike"``.
"""
from __future__ import annotations

import logging
import math
import numbers
from typing import Any, Callable

logger = logging.getLogger(__name__)

WATCHED = ("loss", "grad_norm")


class SpikeGuard:
    """Skips optimizer steps whose global loss (or gradient norm) spikes; rolls back after a streak.

    watch: ``"grad_norm"`` (before clipping) or ``"loss"`` (the window's loss over every rank).
    threshold: deviations above the running mean that make a spike.
    warmup: steps observed before any can be a spike.
    decay: of the moving averages (0.98: about the last 50 steps weigh).
    max_consecutive: spikes in a row that make a rollback (None: skip only, never roll back).
    min_deviation: the deviation is at least this fraction of ``|mean|``.
    """

    def __init__(self, watch: str = "grad_norm", threshold: float = 6.0, warmup: int = 20, decay: float = 0.98,
                 max_consecutive: int | None = 3, min_deviation: float = 0.2) -> None:
        if watch not in WATCHED:
            raise ValueError(f"SpikeGuard(watch={watch!r}) is not one of {list(WATCHED)}")
        for name, value, low, high in (("threshold", threshold, 0.0, math.inf), ("decay", decay, 0.0, 1.0),
                                       ("min_deviation", min_deviation, 0.0, math.inf)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low < value < high:
                raise ValueError(f"SpikeGuard({name}={value!r}) must be a number in ({low}, {high})")
        for name, value, minimum in (("warmup", warmup, 0), ("max_consecutive", max_consecutive, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise ValueError(f"SpikeGuard({name}={value!r}) must be an int >= {minimum}"
                                 + (" or None" if name == "max_consecutive" else ""))
        if warmup is None:
            raise ValueError("SpikeGuard(warmup=None) must be an int >= 0")
        self.watch, self.threshold, self.warmup, self.decay = watch, float(threshold), warmup, float(decay)
        self.max_consecutive, self.min_deviation = max_consecutive, float(min_deviation)
        self.roll_back: Callable[[int], dict[str, Any] | None] | None = None  # set by the Trainer
        self.load_state_dict(None)

    def fresh(self) -> "SpikeGuard":
        """A guard with these settings and no history (one per Trainer)."""
        return SpikeGuard(self.watch, self.threshold, self.warmup, self.decay, self.max_consecutive,
                          self.min_deviation)

    # ------------------------------------------------------------------ the decision
    def limit(self) -> float:
        """The value above which the next one is a spike (infinite during the warm-up)."""
        if self.count < max(self.warmup, 1):
            return math.inf
        return self.mean + self.threshold * max(math.sqrt(self.var), self.min_deviation * abs(self.mean))

    def observe(self, value: float, where: dict[str, Any]) -> bool:
        """Take one step's value; return True when it is a spike (the step is to be skipped)."""
        if not math.isfinite(value):
            return False  # a non-finite step is on_nonfinite's to handle, and never reaches here
        limit = self.limit()
        if value > limit:
            self.streak += 1
            self._record("skip", where, value=value, mean=self.mean, limit=limit)
            return True
        self.streak = 0
        self.count += 1
        if self.count == 1:
            self.mean = value
        else:  # exponentially weighted mean and variance (West, 1979)
            delta = value - self.mean
            self.mean += (1.0 - self.decay) * delta
            self.var = self.decay * (self.var + (1.0 - self.decay) * delta * delta)
        return False

    def after_skip(self, where: dict[str, Any]) -> None:
        """After a skipped spike: a rollback when the streak is long enough."""
        if self.max_consecutive is None or self.streak < self.max_consecutive:
            return
        self.streak = 0
        restored = self.roll_back(where["step"] - 1) if self.roll_back is not None else None
        if restored is None:
            raise RuntimeError(
                f"{self.max_consecutive} loss spikes in a row up to optimizer step {where['step']} (epoch "
                f"{where['epoch']}) and no step checkpoint older than step {where['step'] - 1} to roll back to; "
                "save some with ModelCheckpoint(every_n_steps=...) in checkpoint_dir, or pass "
                "SpikeGuard(max_consecutive=None) to skip spikes without rolling back")
        self._record("rollback", where, to_step=restored["global_step"], checkpoint=restored["checkpoint"],
                     from_epoch=restored["epoch"], from_batch=restored["batch_in_epoch"])

    def _record(self, action: str, where: dict[str, Any], **values: Any) -> None:
        event = {"action": action, **where, **values}
        self.events.append(event)
        if action == "skip":
            logger.warning("loss-spike guard: %s %.6g above its limit %.6g (mean %.6g) at optimizer step %d "
                           "(epoch %d, micro-batches %d-%d): step skipped (%d in a row)", self.watch, values["value"],
                           values["limit"], values["mean"], where["step"], where["epoch"], where["first_batch"],
                           where["last_batch"], self.streak)
        else:
            logger.warning("loss-spike guard: %d spikes in a row: rolled back to %s (optimizer step %d); the data "
                           "goes on, skipping epoch %d from micro-batch %d up to epoch %d micro-batch %d",
                           self.max_consecutive, values["checkpoint"], values["to_step"], values["from_epoch"],
                           values["from_batch"], where["epoch"], where["last_batch"])

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "var": self.var, "streak": self.streak,
                "events": [dict(event) for event in self.events]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore; None (a checkpoint written without the guard) starts it afresh."""
        state = state or {}
        self.count, self.mean = int(state.get("count", 0)), float(state.get("mean", 0.0))
        self.var, self.streak = float(state.get("var", 0.0)), int(state.get("streak", 0))
        self.events: list[dict[str, Any]] = [dict(event) for event in state.get("events", [])]


def make_spike_guard(value: Any) -> SpikeGuard | None:
    """The Trainer's ``spike_guard`` option: False/None (off), True (the defaults) or a ``SpikeGuard``."""
    if value is None or value is False:
        return None
    if value is True:
        return SpikeGuard()
    if isinstance(value, SpikeGuard):
        return value.fresh()
    raise TypeError(f"spike_guard must be True, False or a SpikeGuard(...), got {type(value).__name__} {value!r}")
