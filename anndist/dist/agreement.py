"""The stop agreement: every rank stops after the same optimizer step, whichever rank asked.

Any rank may set ``trainer.stop_training`` at any moment (a callback, a signal handler). Ranks that
stopped at different steps would leave the others blocked in the next gradient all-reduce, so the
flag is reduced (MAX) across ranks and every rank acts on the reduced value only.

Protocol, per optimizer step, on every rank:

1. ``propose(flag)`` starts an *asynchronous* MAX all-reduce of ``[flag, wish]`` and returns the
   result of the *previous* proposal. The collective overlaps a whole step of compute, so a
   healthy step pays one tiny message and never waits for it. A stop proposed after step s is
   therefore acted on after step s+1, on every rank alike.
2. With ``period`` > 0 a proposal is made only every N-th call. ``wish`` is the N this rank would
   like (``period`` divided by its recent time per call); the MAX of the wishes travels in the same
   all-reduce, so every rank reads the same N at the same call and proposes at the same calls.
3. ``settle()`` waits for the outstanding proposal; it is called before any other collective that
   could otherwise interleave with it (the epoch's loss reduction, a checkpoint) and at the end.
4. ``decide(flag)`` is the synchronous form, used between epochs.

Ranks call ``propose`` at the same points (after each optimizer step), which is what makes the
reduced values line up: never call it from code that only some ranks run.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from .collectives import is_initialized, world_size


class StopAgreement:
    """A flag every rank sees set, after the same call, once any rank set it (protocol above)."""

    MAX_INTERVAL = 1000

    def __init__(self, device: torch.device, period: float = 0.0) -> None:
        self._distributed = is_initialized() and world_size() > 1
        self._device = device
        self._period = period
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._interval = 1   # calls between proposals, the same on every rank
        self._countdown = 1  # calls until the next proposal
        self._last: float | None = None  # perf_counter() at the last proposal

    def propose(self, flag: bool) -> bool:
        """Offer this rank's flag; return the agreed flag of the previous proposal (False between proposals)."""
        if not self._distributed:
            return flag
        self._countdown -= 1
        if self._countdown > 0:
            return False
        agreed = self.settle()
        self._countdown = self._interval
        value = torch.tensor([1 if flag else 0, self._wish()], dtype=torch.int32, device=self._device)
        self._pending = (dist.all_reduce(value, op=dist.ReduceOp.MAX, async_op=True), value)
        return agreed

    def _wish(self) -> int:
        """Calls between proposals that would span ``period`` at this rank's recent pace."""
        if self._period <= 0:
            return 1
        now, last, self._last = time.perf_counter(), self._last, time.perf_counter()
        if last is None or now <= last:
            return 1
        per_call = (now - last) / self._interval
        return max(1, min(self.MAX_INTERVAL, int(self._period / per_call)))

    def settle(self) -> bool:
        """Wait for the outstanding proposal (if any) and return its agreed flag."""
        if self._pending is None:
            return False
        work, value = self._pending
        self._pending = None
        work.wait()
        flag, interval = value.tolist()
        self._interval = interval  # every rank reads the same reduced value here
        return bool(flag)

    def decide(self, flag: bool) -> bool:
        """Synchronous agreement: settle what is pending, then reduce ``flag`` now."""
        pending = self.settle()
        if not self._distributed:
            return flag or pending
        value = torch.tensor([1 if flag or pending else 0], dtype=torch.int32, device=self._device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())
