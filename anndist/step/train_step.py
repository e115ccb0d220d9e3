"""One accumulation window: forward and backward of each micro-batch, then one optimizer step.

``Trainer._run_batches`` calls it around the callbacks::

    for each micro-batch of a window:   loss, n, items = step.micro_batch(batch, ends_window)
    at the window's end:                stepped = step.finish_window(where)   # where() names the step in errors

``micro_batch`` runs the forward and the loss under autocast, then the backward of the loss weighted
for the window, inside the strategy's ``no_sync`` except on the window's last micro-batch, so gradients
are reduced once per window. ``finish_window`` hands the window's normalisation correction to
``OptimizerStep`` (unscale, non-finite check, clip, step, scheduler, zero_grad).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..strategies.base import Strategy
from .accumulation import Window
from .loss import LossStep
from .optimization import OptimizerStep
from .precision import Precision
from .train_state import EpochSums


class TrainStep:
    """Runs micro-batches and optimizer steps on the strategy's ``train_module``.

    ``accumulation`` is ``(K, sum_reduction)``: micro-batches per window, and whether the loss is a sum
    over the batch (``reduction="sum"``) rather than a mean (accumulation.py weighs them).
    """

    def __init__(self, strategy: Strategy, loss: LossStep, precision: Precision, optimizer_step: OptimizerStep,
                 epoch_sums: EpochSums, accumulation: tuple[int, bool]) -> None:
        self.strategy, self.model, self.loss = strategy, strategy.train_module, loss
        self.precision, self.optimizer_step, self.epoch_sums = precision, optimizer_step, epoch_sums
        self.k, self.sum_reduction = accumulation
        self.data = strategy.data  # items are counted over the ranks that read different data
        self.window = Window(self.k, self.sum_reduction, None, self.data.world_size, self.data.group)
        self.autocasts = precision.dtype is not None
        self._no_sync = strategy.no_sync
        if self._no_sync is None:  # nothing to hold back: no context around a micro-batch, not even a call
            self.micro_batch = self._forward_backward  # type: ignore[method-assign]

    def begin_epoch(self, nominal_batch: int | None) -> None:
        """Start a fresh window; ``nominal_batch`` (the loader's batch size) weighs full windows exactly."""
        self.window = Window(self.k, self.sum_reduction, nominal_batch, self.data.world_size, self.data.group)

    def micro_batch(self, batch: Any, sync: bool) -> tuple[torch.Tensor, int, Any]:
        """Forward and backward of one micro-batch; return its detached loss, samples and items (or samples)."""
        try:  # (without a no_sync context this is _forward_backward itself: see __init__)
            if sync:  # the window's last micro-batch reduces its gradients: no context to enter
                return self._forward_backward(batch, sync)
            with self._no_sync():
                return self._forward_backward(batch, sync)
        except RuntimeError as exc:
            self.strategy.explain(exc)

    def _forward_backward(self, batch: Any, sync: bool) -> tuple[torch.Tensor, int, Any]:
        if self.autocasts:
            with self.precision.autocast():
                loss, n, num_items = self.loss(self.model, batch)
        else:  # without autocast, not even a null context: this runs for every micro-batch
            loss, n, num_items = self.loss(self.model, batch)
        detached = loss.detach()
        weight, count = self.window.add(detached, n, num_items)
        if sync:
            self.window.count_items(self.loss.device)  # items mode: overlaps the backward below
            if self.optimizer_step.carries_losses:
                self.optimizer_step.carry_losses(self.window.losses)  # a NaN loss reaches every rank
        self.precision.backward(loss if type(weight) is float and weight == 1.0 else loss * weight)
        return detached, n, count

    def finish_window(self, where: Callable[[], str]) -> bool:
        """The optimizer step that ends the window, whose losses then go to the epoch's sums; return
        False when it was skipped."""
        window = self.window
        stepped = self.optimizer_step(window.correction(where), window.losses, where, window.counts)
        self.epoch_sums.add_window(window.losses, window.counts, stepped)
        window.reset()
        return stepped
