"""One accumulation window: forward and backward of each micro-batch, then one optimizer step.

``Trainer._run_batches`` calls it around the callbacks::

    for each micro-batch of a window:   loss, n = step.micro_batch(batch, ends_window)
    at the window's end:                stepped = step.finish_window(where)   # where() names the step in errors

``micro_batch`` runs the forward and the loss under autocast, then the backward of the loss weighted
for the window, inside DDP's ``no_sync`` except on the window's last micro-batch, so gradients are
all-reduced once per window. ``finish_window`` hands the window's normalisation correction to
``OptimizerStep`` (unscale, non-finite check, clip, step, scheduler, zero_grad).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .accumulation import Window
from ..data.batch import prepare_batch, to_device
from ..strategies.ddp_errors import raise_explained
from ..strategies.fsdp import is_sharded, no_gradient_sync
from .loss import call_on_inputs, check_result, sample_count
from .optimization import OptimizerStep
from .precision import Precision
from .train_state import EpochSums


class TrainStep:
    """Runs micro-batches and optimizer steps on ``model`` (the DDP wrapper, or ``module`` alone;
    ``module`` is what DDP wraps: the compiled module with ``compile=``).

    ``compute_loss(model, batch)`` is the user's loss step (see ``loss.py``); None means the
    criterion path, kept as the short path it always was: split, move, ``criterion(model(inputs), targets)``.
    """

    def __init__(self, model: nn.Module, module: nn.Module, criterion: Callable | None,
                 compute_loss: Callable | None, precision: Precision, optimizer_step: OptimizerStep,
                 accumulation_steps: int, sum_reduction: bool, device: torch.device, world_size: int,
                 epoch_sums: EpochSums) -> None:
        self.model, self.module, self.criterion, self.compute_loss = model, module, criterion, compute_loss
        self.precision, self.optimizer_step, self.epoch_sums = precision, optimizer_step, epoch_sums
        self.k, self.sum_reduction, self.device, self.world_size = accumulation_steps, sum_reduction, device, world_size
        self.non_blocking = device.type == "cuda"
        self.window = Window(accumulation_steps, sum_reduction, None, world_size)
        self.sharded = is_sharded(module)
        self.autocasts = precision.dtype is not None
        if not isinstance(model, DistributedDataParallel) and not self.sharded:
            # One process, unsharded: no context around a micro-batch, so not even the call of one.
            self.micro_batch = self._forward_backward  # type: ignore[method-assign]

    def begin_epoch(self, nominal_batch: int | None) -> None:
        """Start a fresh window; ``nominal_batch`` (the loader's batch size) weighs full windows exactly."""
        self.window = Window(self.k, self.sum_reduction, nominal_batch, self.world_size)

    def micro_batch(self, batch: Any, sync: bool) -> tuple[torch.Tensor, int, Any]:
        """Forward and backward of one micro-batch; return its detached loss, samples and items (or samples)."""
        try:  # (in one process this is _forward_backward itself: see __init__)
            if sync:  # the window's last micro-batch reduces its gradients: no context to enter
                return self._forward_backward(batch, sync)
            with no_gradient_sync(self.model, self.module, self.sharded):
                return self._forward_backward(batch, sync)
        except RuntimeError as exc:
            raise_explained(exc, self.model)

    def _forward_backward(self, batch: Any, sync: bool) -> tuple[torch.Tensor, int, Any]:
        if self.autocasts:
            with self.precision.autocast():
                loss, n, num_items = self.loss(batch)
        else:  # without autocast, not even a null context: this runs for every micro-batch
            loss, n, num_items = self.loss(batch)
        detached = loss.detach()
        weight, count = self.window.add(detached, n, num_items)
        if sync:
            self.window.count_items(self.device)  # items mode: overlaps the backward below
            if self.optimizer_step.carries_losses:
                self.optimizer_step.carry_losses(self.window.losses)  # a NaN loss reaches every rank
        self.precision.backward(loss if type(weight) is float and weight == 1.0 else loss * weight)
        return detached, n, count

    def loss(self, batch: Any) -> tuple[torch.Tensor, int, Any]:
        """``(loss, samples, num_items or None)`` of one micro-batch, moved to the device here."""
        if self.compute_loss is None:
            inputs, targets, n = prepare_batch(batch, self.device, self.non_blocking)
            output = self.model(inputs) if type(inputs) is torch.Tensor else call_on_inputs(self.model, inputs)
            return self.criterion(output, targets), n, None
        batch = to_device(batch, self.device, self.non_blocking)
        loss, num_items = check_result(self.compute_loss(self.model, batch))
        return loss, sample_count(batch, self.criterion is not None), num_items

    def finish_window(self, where: Callable[[], str]) -> bool:
        """The optimizer step that ends the window, whose losses then go to the epoch's sums; return
        False when it was skipped."""
        window = self.window
        stepped = self.optimizer_step(window.correction(where), window.losses, where, window.counts)
        self.epoch_sums.add_window(window.losses, window.counts, stepped)
        window.reset()
        return stepped
