"""One accumulation window: forward and backward of each micro-batch, then one optimizer step.

``Trainer._run_batches`` calls it around the callbacks::

    for each micro-batch of a window:   loss, n, items = step.micro_batch(batch, ends_window)
    at the window's end:                stepped = step.finish_window(where)   # where() names the step in errors

``micro_batch`` runs the forward and the loss under autocast, then the backward of the loss weighted
for the window, inside the strategy's ``no_sync`` except on the window's last micro-batch, so gradients
are reduced once per window. ``finish_window`` hands the window's normalisation correction to
``OptimizerStep`` (unscale, non-finite check, clip, step, scheduler, zero_grad).

Two options change these paths, and only when they are on: a global batch with a seed reseeds the
forward of each micro-batch from the piece of the epoch's global order it holds (``seed.py``,
``data/global_batch.py``), so dropout does not depend on the number of ranks; the loss-spike guard
(``spike_guard.py``) decides before each step whether its gradients are dropped.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..data.global_batch import epoch_shape
from ..seed import micro_batch_seed, reseed_forward
from ..strategies.base import Strategy
from .accumulation import Window
from .loss import LossStep
from .optimization import OptimizerStep
from .precision import Precision
from .train_state import EpochSums, TrainState

if TYPE_CHECKING:
    from .spike_guard import SpikeGuard


class TrainStep:
    """Runs micro-batches and optimizer steps on the strategy's ``train_module``.

    ``accumulation`` is ``(K, sum_reduction)``: micro-batches per window, and whether the loss is a sum
    over the batch (``reduction="sum"``) rather than a mean (accumulation.py weighs them).
    """

    def __init__(self, strategy: Strategy, loss: LossStep, precision: Precision, optimizer_step: OptimizerStep,
                 epoch_sums: EpochSums, accumulation: tuple[int, bool], reseed: int | None = None) -> None:
        self.strategy, self.model, self.loss = strategy, strategy.train_module, loss
        self.precision, self.optimizer_step, self.epoch_sums = precision, optimizer_step, epoch_sums
        self.k, self.sum_reduction = accumulation
        self.data = strategy.data  # items are counted over the ranks that read different data
        self.window = Window(self.k, self.sum_reduction, None, self.data.world_size, self.data.group)
        self.autocasts = precision.dtype is not None
        self._no_sync = strategy.no_sync
        if self._no_sync is None:  # nothing to hold back: no context around a micro-batch, not even a call
            self.micro_batch = self._forward_backward  # type: ignore[method-assign]
        self.spike_guard: SpikeGuard | None = None
        self._reseed, self._shape, self._batch_idx = reseed, None, 0
        if reseed is not None:  # a global batch with a seed: each micro-batch's forward from its own seed
            self._unseeded, self.micro_batch = self.micro_batch, self._seeded_micro_batch  # type: ignore[method-assign]

    def release(self) -> None:
        """Let go of the wrapper the strategy released (DDP's reducer holds the process group, which must
        not outlive its destroy): train on what the strategy trains on now, with nothing to hold back."""
        self.model, self._no_sync = self.strategy.train_module, contextlib.nullcontext

    def begin_epoch(self, loader: Any, epoch: int, first_batch: int) -> None:
        """Start a fresh window for ``epoch`` of ``loader`` from micro-batch ``first_batch``: the loader's
        batch size weighs full windows exactly; a global batch's shape (``epoch_shape``) also gives the
        windows' sample counts and the pieces' numbers."""
        shape = epoch_shape(loader, epoch, first_batch)
        self.window = Window(self.k, self.sum_reduction, shape.nominal_batch, self.data.world_size, self.data.group,
                             shape.windows, shape.last_correction,
                             self.spike_guard is not None and self.spike_guard.watch == "loss")
        self._shape, self._batch_idx = shape, shape.first_batch

    def _seeded_micro_batch(self, batch: Any, sync: bool) -> tuple[torch.Tensor, int, Any]:
        shape = self._shape
        if shape.windows:  # the loader reads the epoch's global order (a loader anndist rebuilt)
            piece = shape.piece(self._batch_idx, self.k)
            reseed_forward(micro_batch_seed(self._reseed, shape.epoch, piece), self.loss.device)
        self._batch_idx += 1
        return self._unseeded(batch, sync)

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

    # ------------------------------------------------------------------ the loss-spike guard
    def guard(self, spike_guard: "SpikeGuard | None", state: TrainState, roll_back: Callable[[int], Any]) -> None:
        """Turn the guard on: asked before every finite step, told after every skipped one; its state
        travels in ``state``'s checkpoint entry, and ``roll_back(before_step)`` restores older weights.
        None (off) changes nothing: not even a test on the step's path."""
        if spike_guard is None:
            return
        self.spike_guard, self.state, self._spiked = spike_guard, state, False
        spike_guard.roll_back, state.spike_guard = roll_back, spike_guard
        self.optimizer_step.guard(self._spike_check, spike_guard.watch == "grad_norm")
        self.finish_window = self._guarded_finish_window  # type: ignore[method-assign]

    def _guarded_finish_window(self, where: Callable[[], str]) -> bool:
        state, micro_batches = self.state, len(self.window.losses)
        self._where = {"epoch": state.epoch, "step": state.global_step + 1, "window": state.batch_in_epoch // self.k,
                       "first_batch": state.batch_in_epoch, "last_batch": state.batch_in_epoch + micro_batches - 1}
        stepped = TrainStep.finish_window(self, where)
        if self._spiked:
            self._spiked = False
            self.spike_guard.after_skip(self._where)  # a rollback after enough spikes in a row
        return stepped

    def _spike_check(self, grad_norm: float) -> bool:
        guard = self.spike_guard
        self._spiked = guard.observe(self.window.reduced_loss() if guard.watch == "loss" else grad_norm, self._where)
        return self._spiked
