"""One optimizer step at the end of an accumulation window.

In order: unscale (fp16), correct the window's normalisation when it held a different number of
samples than a full window, measure the global gradient norm, handle a non-finite norm, clip,
step, advance the scheduler, zero the gradients. Gradients are already all-reduced here, so the
norm (and every decision taken from it) is identical on every rank without another collective.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from . import process_group
from .precision import Precision

NONFINITE_POLICIES = ("error", "skip")


class NonFiniteLossError(FloatingPointError):
    """The loss (or the gradient) became NaN or infinite; the message names the step and the ranks."""


class OptimizerStep:
    def __init__(self, optimizer: torch.optim.Optimizer, precision: Precision, scheduler: Any,
                 step_scheduler: bool, max_grad_norm: float | None, on_nonfinite: str) -> None:
        self.optimizer = optimizer
        self.precision = precision
        self.scheduler = scheduler
        self.step_scheduler = step_scheduler
        self.max_grad_norm = max_grad_norm
        self.on_nonfinite = on_nonfinite
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.last_grad_norm: float = float("nan")

    def __call__(self, correction: float, window_losses: list[torch.Tensor], where: str) -> bool:
        """Take the step; return False when it was skipped (fp16 overflow or a skipped non-finite loss)."""
        self.precision.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        if correction != 1.0 and grads:
            torch._foreach_mul_(grads, correction)
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        self.last_grad_norm = float(norm)
        if not math.isfinite(self.last_grad_norm):
            stepped = self._nonfinite(window_losses, where)
        else:
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.max_grad_norm, norm)
            stepped = self.precision.step(self.optimizer)
        if stepped and self.step_scheduler:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stepped

    def _nonfinite(self, window_losses: list[torch.Tensor], where: str) -> bool:
        # Every rank is here (the norm is of all-reduced gradients), so this gather cannot hang.
        local_bad = any(not torch.isfinite(loss).item() for loss in window_losses)
        bad_ranks = [r for r, bad in enumerate(process_group.all_gather_object(local_bad)) if bad]
        if not bad_ranks and self.precision.scaler is not None:
            return self.precision.step(self.optimizer)  # an fp16 overflow: the scaler skips and backs off
        what = f"non-finite loss on rank(s) {bad_ranks}" if bad_ranks else "non-finite gradient norm with finite losses"
        if self.on_nonfinite == "error":
            raise NonFiniteLossError(
                f"{what} at {where}; pass on_nonfinite='skip' to skip such steps, or lower the learning rate"
            )
        if self.precision.scaler is not None:
            self.precision.step(self.optimizer)  # lets the scaler record the skip and back off
        return False
