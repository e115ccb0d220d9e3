"""One accumulation window: forward and backward of each micro-batch, then one optimizer step.

``Trainer._run_batches`` calls it around the callbacks::

    for each micro-batch of a window:   loss, n = step.micro_batch(batch, ends_window)
    at the window's end:                stepped = step.finish_window(where)

``micro_batch`` runs the forward and the loss under autocast, then the backward of the loss weighted
for the window, inside DDP's ``no_sync`` except on the window's last micro-batch, so gradients are
all-reduced once per window. ``finish_window`` hands the window's normalisation correction to
``OptimizerStep`` (unscale, non-finite check, clip, step, scheduler, zero_grad).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from .accumulation import Window
from .batch import prepare_batch
from .optimization import OptimizerStep
from .precision import Precision


class TrainStep:
    """Runs micro-batches and optimizer steps on ``model`` (the DDP wrapper, or ``module`` alone)."""

    def __init__(self, model: nn.Module, module: nn.Module, criterion: Callable, precision: Precision,
                 optimizer_step: OptimizerStep, accumulation_steps: int, sum_reduction: bool,
                 device: torch.device) -> None:
        self.model, self.module, self.criterion = model, module, criterion
        self.precision, self.optimizer_step = precision, optimizer_step
        self.k, self.sum_reduction, self.device = accumulation_steps, sum_reduction, device
        self.non_blocking = device.type == "cuda"
        self.window = Window(accumulation_steps, sum_reduction, None)

    def begin_epoch(self, nominal_batch: int | None) -> None:
        """Start a fresh window; ``nominal_batch`` (the loader's batch size) weighs full windows exactly."""
        self.window = Window(self.k, self.sum_reduction, nominal_batch)

    def micro_batch(self, batch: Any, sync: bool) -> tuple[torch.Tensor, int]:
        """Forward and backward of one micro-batch; return its detached loss and its sample count."""
        inputs, targets, n = prepare_batch(batch, self.device, self.non_blocking)
        distributed = self.model is not self.module
        with self.model.no_sync() if distributed and not sync else contextlib.nullcontext():
            with self.precision.autocast():
                loss = self.criterion(self.model(inputs), targets)
            weight = self.window.weight(n)
            self.precision.backward(loss * weight if weight != 1.0 else loss)
        loss = loss.detach()
        self.window.add(loss, n)
        return loss, n

    def finish_window(self, where: str) -> bool:
        """The optimizer step that ends the window; return False when it was skipped."""
        stepped = self.optimizer_step(self.window.correction(), self.window.losses, where)
        self.window.reset()
        return stepped
