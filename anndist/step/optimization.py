"""One optimizer step at the end of an accumulation window.

In order: unscale (fp16); in one fused pass, correct the window's normalisation (when it held a
different number of samples than a full window) and check the gradients for NaN/inf; handle a
non-finite gradient; clip; step; advance the scheduler; zero the gradients. Gradients are already
reduced here; where each rank holds only part of them, the strategy reduces the non-finite flag and
the norm, so every decision taken from them is identical on every rank.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..dist import collectives
from ..strategies.base import Strategy
from .precision import Precision

NONFINITE_POLICIES = ("error", "skip")


class NonFiniteLossError(FloatingPointError):
    """The loss (or the gradient) became NaN or infinite; the message names the step and the ranks."""


class OptimizerStep:
    def __init__(self, optimizer: torch.optim.Optimizer, precision: Precision, scheduler: Any,
                 step_scheduler: bool, max_grad_norm: float | None, on_nonfinite: str, strategy: Strategy) -> None:
        self.optimizer, self.strategy = optimizer, strategy
        self.precision = precision
        self.scheduler = scheduler
        self.step_scheduler = step_scheduler
        self.max_grad_norm = max_grad_norm
        self.on_nonfinite = on_nonfinite
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.last_grad_norm: float = float("nan")  # before clipping; measured only when clipping
        self._uniform = len({(p.device, p.dtype) for p in self.params}) <= 1
        self._found_inf: dict[torch.device, tuple[torch.Tensor, torch.Tensor, Any]] = {}
        # Each rank holds part of every gradient (FSDP): the NaN/inf verdict is reduced across ranks.
        self._sharded = strategy.sharded
        requiring = [p for p in self.params if p.requires_grad]
        # DDP: a bad loss travels in the gradient all-reduce (carry_losses), into the smallest gradient.
        self._anchor = min(requiring, key=torch.Tensor.numel) if requiring and strategy.carries_losses else None
        self.carries_losses = self._anchor is not None
        # The loss-spike guard (spike_guard.py), given the gradient norm: True drops the step. Only a
        # guarded run takes the other path: an unguarded step does not even test for it.
        self.spike_check: Callable[[float], bool] | None = None
        self.watches_norm = False

    def guard(self, spike_check: Callable[[float], bool], watches_norm: bool) -> None:
        """Ask ``spike_check(grad_norm)`` before every finite step (``watches_norm``: measure the norm even
        without clipping)."""
        self.spike_check, self.watches_norm = spike_check, watches_norm
        self._finite_step = self._guarded_step  # type: ignore[method-assign]

    def carry_losses(self, losses: list[torch.Tensor]) -> None:
        """Add ``0 * loss`` for each of the window's (detached) losses to the smallest gradient, before
        its last backward (DDP on several ranks: ``carries_losses``).

        That adds nothing when the losses are finite and puts a NaN in the gradient when one is not
        (0 * inf and 0 * NaN are NaN). A loss can be NaN while its gradients are finite (a NaN term that
        does not depend on the weights), and each rank sees only its own losses; through the gradient,
        DDP's all-reduce carries a bad loss to every rank, so the found-inf check of the step decides
        alike everywhere without a collective of its own: one foreach kernel call per optimizer step.
        In one process, and under FSDP (whose found-inf flag is all-reduced anyway), the losses join
        the gradients in the fused check of the step instead (``_scale_and_check``): no kernel at all.
        """
        anchor = self._anchor
        if anchor.grad is None:
            anchor.grad = torch.zeros_like(anchor)
        torch._foreach_add_([anchor.grad] * len(losses), losses, alpha=0)  # NaN-preserving: no 0 * x shortcut

    def __call__(self, correction: float, window_losses: list[torch.Tensor], where: Callable[[], str],
                 window_counts: list[Any] = ()) -> bool:
        """Take the step; return False when it was skipped (fp16 overflow or a skipped non-finite loss).
        ``window_counts``: each micro-batch's items (or samples), read only to explain a non-finite loss."""
        if self.precision.scales_loss:
            self.precision.unscale_(self.optimizer)
        if self._scale_and_check(correction, None if self.carries_losses else window_losses):
            stepped = self._nonfinite(window_losses, where, window_counts)
        else:
            stepped = self._finite_step()
        if stepped and self.step_scheduler:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stepped

    def _finite_step(self) -> bool:
        if self.max_grad_norm is not None:
            self.last_grad_norm = self.strategy.clip_grad_norm(self.params, self.max_grad_norm)
        return self.precision.step(self.optimizer)

    def _guarded_step(self) -> bool:
        """The finite step of a guarded run: a spike's gradients are dropped before the optimizer sees them."""
        if self.max_grad_norm is not None or self.watches_norm:  # an infinite bound measures without clipping
            self.last_grad_norm = self.strategy.clip_grad_norm(self.params, self.max_grad_norm or math.inf)
        if self.spike_check(self.last_grad_norm):
            self.precision.drop(self.optimizer)
            return False
        return self.precision.step(self.optimizer)

    def _scale_and_check(self, correction: float, losses: list[torch.Tensor] | None) -> bool:
        """Multiply the gradients by ``correction`` and return True if any (or any of ``losses``) is NaN or infinite.

        GradScaler's fused kernel does both in one pass (about 5 us for a small model where a norm
        costs 20 us), which keeps the check affordable on every step.
        """
        grads = [grad for p in self.params if (grad := p.grad) is not None]  # one .grad read each
        if self._sharded:
            grads = self.strategy.local_grads(grads)
        if self._uniform:  # the usual case: one device, one dtype, one kernel call
            return self._check_group(grads, correction, losses)
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for grad in grads:
            groups.setdefault((grad.device, grad.dtype), []).append(grad)
        return any([self._check_group(group, correction, losses if i == 0 else None)
                    for i, group in enumerate(groups.values())])

    def _check_group(self, grads: list[torch.Tensor], correction: float, losses: list[torch.Tensor] | None) -> bool:
        if not grads:
            return False
        device = grads[0].device
        found, one, host_flag = self._found_inf.get(device) or self._buffers(device)  # found is 0: see below
        scale = one if correction == 1.0 else torch.full((1,), correction, device=device)
        if losses:
            if scale is not one or losses[0].device != device:  # the kernel scales them too: scale copies
                losses = [loss.to(device, copy=True) for loss in losses]
            grads = [*grads, *losses]  # times 1.0 in place: the losses stay exactly as they are
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, scale)
        if self._sharded:
            self.strategy.reduce_found_inf(found)
        if not (found.item() if host_flag is None else host_flag[0]):
            return False
        found.zero_()  # only after a non-finite step: one kernel less on every healthy one
        return True

    def _buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The found-inf flag and a constant 1.0 on ``device``, allocated once, and on the CPU a numpy
        view of the flag, which reads it without an ``item()`` dispatch on every step."""
        found = torch.zeros(1, device=device)
        host_flag = found.numpy() if device.type == "cpu" else None
        self._found_inf[device] = (found, torch.ones(1, device=device), host_flag)
        return self._found_inf[device]

    def _nonfinite(self, window_losses: list[torch.Tensor], where: Callable[[], str], counts: list[Any]) -> bool:
        # Every rank is here (the norm is of all-reduced gradients), so this gather cannot hang.
        bad = [not torch.isfinite(loss).item() for loss in window_losses]
        empty = [i for i, (b, count) in enumerate(zip(bad, counts)) if b and float(count) == 0]  # num_items=0
        reports = collectives.all_gather_object((any(bad), empty))
        bad_ranks = [r for r, (b, _) in enumerate(reports) if b]
        if not bad_ranks and self.precision.scales_loss:
            return self.precision.step(self.optimizer)  # an fp16 overflow: the scaler skips and backs off
        what = f"non-finite loss on rank(s) {bad_ranks}" if bad_ranks else "non-finite gradient norm with finite losses"
        advice = "pass on_nonfinite='skip' to skip such steps, or lower the learning rate"
        empty_by_rank = {r: e for r, (_, e) in enumerate(reports) if e}
        if empty_by_rank:  # a mean over no items (0/0), not a diverging run
            which = "; ".join(f"rank {r}: micro-batch(es) {e} of the window" for r, e in empty_by_rank.items())
            what = f"NaN loss from micro-batch(es) whose compute_loss gave num_items=0 (every item ignored) ({which})"
            advice = ("a mean over no items is 0/0: return a loss of 0 for them (e.g. per_item.sum() / "
                      "max(num_items, 1)) or leave such batches out")
        if self.on_nonfinite == "error":
            raise NonFiniteLossError(f"{what} at {where()}; {advice}")
        self.precision.skip(self.optimizer)
        return False


def step_epoch_scheduler(scheduler: Any, monitor: str, logs: dict[str, float], evaluates_by_steps: bool) -> None:
    """An epoch-interval scheduler at an epoch's end; ReduceLROnPlateau steps after each evaluation
    instead when evaluations run every N steps (unless it watches train_loss)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step()
    elif not evaluates_by_steps or monitor == "train_loss":
        step_plateau(scheduler, monitor, logs)


def step_plateau(scheduler: Any, monitor: str, logs: dict[str, float]) -> None:
    """ReduceLROnPlateau on ``logs[monitor]`` (no-op for other schedulers)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return
    if monitor not in logs:
        raise ValueError(f"scheduler_monitor={monitor!r} is not among the metrics {sorted(logs)}; pass a "
                         "val_loader or monitor 'train_loss'")
    scheduler.step(logs[monitor])
