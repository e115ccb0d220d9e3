"""Where a run is: the state a checkpoint must carry to continue a run exactly.

``TrainState`` is the same on every rank: epoch, optimizer steps, position in the epoch, history.
``EpochSums`` is each rank's own: its partial sum of the epoch's train loss and its sample count,
so a resumed epoch reports the same ``train_loss`` as an uninterrupted one.
"""
from __future__ import annotations

import logging
import operator
from typing import Any

import torch

from ..data.global_batch import accumulation_steps
from ..dist import collectives
from ..dist.data_layout import DataLayout, owners, same_layout
from .exact_sum import ExactSum

logger = logging.getLogger(__name__)


class TrainState:
    """Progress of a run. ``epoch_done`` is True inside ``on_epoch_end``: a checkpoint taken there
    resumes at the start of the next epoch, which is what ``state_dict`` records."""

    def __init__(self, world_size: int, seed: int | None, accumulation_steps: int | None = 1,
                 global_batch_size: int | None = None) -> None:
        """``accumulation_steps`` None: it follows from ``global_batch_size`` (``count_accumulation``)."""
        self.world_size, self.seed, self.accumulation_steps = world_size, seed, accumulation_steps or 1
        self.global_batch_size = global_batch_size
        self.spike_guard: Any = None  # the loss-spike guard's state travels with the run's (step/spike_guard.py)
        self.epoch = 0            # the epoch being trained, or the next one to train
        self.global_step = 0      # optimizer steps taken
        self.batch_in_epoch = 0   # micro-batches of ``epoch`` this rank trained (after a step)
        self.epoch_done = False
        self.history: dict[str, list[float]] = {}

    def count_accumulation(self, explicit: int | None, loader: Any) -> int:
        """K for ``loader``: ``explicit``, or what the global batch makes it (``data/global_batch.py``).
        Set before a resume, which converts a position saved with another K into this one's steps."""
        self.accumulation_steps = accumulation_steps(self.global_batch_size, explicit, loader, self.world_size)
        return self.accumulation_steps

    def finish_epoch(self) -> None:
        self.epoch, self.batch_in_epoch, self.epoch_done = self.epoch + 1, 0, False

    def record(self, logs: dict[str, Any], keys: tuple[str, ...]) -> None:
        for key in keys:
            if key in logs:
                self.history.setdefault(key, []).append(logs[key])

    def state_dict(self) -> dict[str, Any]:
        epoch, batch = (self.epoch + 1, 0) if self.epoch_done else (self.epoch, self.batch_in_epoch)
        return {"epoch": epoch, "global_step": self.global_step, "batch_in_epoch": batch,
                "world_size": self.world_size, "seed": self.seed, "gradient_accumulation_steps": self.accumulation_steps,
                "global_batch_size": self.global_batch_size,
                "history": {key: list(values) for key, values in self.history.items()},
                **({"spike_guard": self.spike_guard.state_dict()} if self.spike_guard is not None else {})}

    def check_state_dict(self, state: dict[str, Any], source: str) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(
                f"checkpoint {source} was trained with seed={state.get('seed')!r} but this Trainer has "
                f"seed={self.seed!r}; the data order depends on the seed, so pass seed={state.get('seed')!r} to resume")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.batch_in_epoch, self.epoch_done = int(state["batch_in_epoch"]), False
        saved_world, saved_k = int(state["world_size"]), state.get("gradient_accumulation_steps")
        same_global = self.global_batch_size is not None and state.get("global_batch_size") == self.global_batch_size
        if same_global and saved_k is not None and (saved_world, int(saved_k)) != (self.world_size, self.accumulation_steps):
            self.batch_in_epoch = self._rescaled_steps(saved_world, int(saved_k))
        elif saved_world != self.world_size:
            self.batch_in_epoch = self._rescaled_position(saved_world)
        if not same_global:  # with the same global batch, K follows the world size and the steps carry over
            if "global_batch_size" in state and state["global_batch_size"] != self.global_batch_size:
                self._warn_global_batch(state["global_batch_size"])
            else:
                self._warn_accumulation(saved_k)
        self.history = {key: list(values) for key, values in state.get("history", {}).items()}
        if self.spike_guard is not None:
            self.spike_guard.load_state_dict(state.get("spike_guard"))

    def _warn_global_batch(self, saved: Any) -> None:
        logger.warning(
            "checkpoint written with global_batch_size=%s, resuming with %s: the samples per optimizer step, the "
            "samples behind global_step %d and a per-step LR schedule's progress per sample change, and the run "
            "does not continue as it would have; pass global_batch_size=%s to continue it",
            saved, self.global_batch_size, self.global_step, saved)

    def _rescaled_steps(self, saved_world: int, saved_k: int) -> int:
        """With the same global batch on another world size (so another K): the same optimizer steps.

        A checkpoint is taken between steps, after ``ceil(batch_in_epoch / K)`` whole steps of the epoch
        (the ceiling counts the epoch's last, short step); each rank continues at that many steps of its
        new K. Past the epoch's end, the sampler ends the epoch.
        """
        steps = -(-self.batch_in_epoch // saved_k)
        logger.info(
            "checkpoint written by %d data-parallel rank(s) with %d micro-batch(es) per step, resuming on %d with %d: "
            "the global batch (%d samples) and the samples of every step carry over; epoch %d continues after its "
            "step %d", saved_world, saved_k, self.world_size, self.accumulation_steps, self.global_batch_size,
            self.epoch, steps)
        return steps * self.accumulation_steps

    def _warn_accumulation(self, saved: Any) -> None:
        """A resume with another K: the position (in micro-batches) carries over, the step does not."""
        if saved is None or int(saved) == self.accumulation_steps:
            return  # None: a checkpoint from before K was recorded
        logger.warning(
            "checkpoint written with gradient_accumulation_steps=%d, resuming with %d: each optimizer step now "
            "takes %d micro-batches instead of %d, so the global batch per step, the samples behind global_step "
            "%d and a per-step LR schedule's progress per sample change, and the run does not continue bit for "
            "bit; pass gradient_accumulation_steps=%d to continue it exactly",
            int(saved), self.accumulation_steps, self.accumulation_steps, int(saved), self.global_step, int(saved))

    def _rescaled_position(self, saved_world: int) -> int:
        """Per-rank batches already trained, for this world size: the same number of samples seen.

        With the same per-rank batch size, ``batch_in_epoch * saved_world`` batches of the epoch's
        global order were consumed; the sampler's order does not depend on the world size, so every
        new rank starts at the same global position.
        """
        consumed = self.batch_in_epoch * saved_world
        batches, leftover = divmod(consumed, self.world_size)
        logger.warning(
            "checkpoint written by %d rank(s), resuming on %d: model, optimizer and position (%d batches of "
            "epoch %d consumed over all ranks) carry over; per-rank RNG streams, the global batch per step and "
            "the sampler's padding differ, so the run does not continue bit for bit",
            saved_world, self.world_size, consumed, self.epoch)
        if leftover:
            logger.warning("%d batch(es) of epoch %d cannot be split over %d ranks and will be trained again",
                           leftover, self.epoch, self.world_size)
        return batches


def add_weighted(total: torch.Tensor, loss: torch.Tensor, n: Any) -> None:
    """``total += loss * n`` in place on the device (no sync): ``n`` an int (samples) or a tensor (items)."""
    if isinstance(n, int):
        total.add_(loss, alpha=n)
    else:
        total.add_(loss.double() * n)


class EpochSums:
    """This rank's sum of ``loss * n`` and of ``n`` in the current epoch, where n is the micro-batch's
    items (``num_items``) or samples.

    A training step adds no tensor operation here: a window's losses are kept as they are on the
    device and folded, ``FOLD`` windows at a time (and whenever the sums are read), into an exact
    float sum with one stack and one copy to the host. The sum is exact (``ExactSum``), so where the
    folds fall (a checkpoint folds early) never changes ``train_loss``.

    ``data`` (the strategy's ``DataLayout``): the epoch's sums are reduced over the ranks that read
    different data, so the ranks of a tensor-parallel group, which train on one batch together, count
    it once; a resume on another layout adds up one entry per data shard."""

    FOLD = 256  # windows kept on the device between folds: bounded memory, one sync per fold

    def __init__(self, rank: int, world_size: int, device: torch.device, data: DataLayout | None = None) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.data = data if data is not None else DataLayout(rank, world_size)
        self.reset()

    def reset(self) -> None:
        self.loss_sum = ExactSum()
        self.items: Any = 0
        self.dropped = 0  # windows of this epoch whose step was skipped
        self._losses: list[torch.Tensor] = []
        self._counts: list[Any] = []
        self._windows = 0

    def add_window(self, losses: list[torch.Tensor], counts: list[Any], stepped: bool) -> None:
        """A finished window's micro-batch losses and their counts, added to the epoch if its optimizer
        step was taken; a skipped window (a non-finite loss under ``on_nonfinite="skip"``, an fp16
        overflow) trained nothing and its NaN would make the epoch's ``train_loss`` NaN, so it is
        dropped. Every rank drops the same windows."""
        if not stepped:
            self.dropped += 1
            return
        self._losses += losses
        self._counts += counts
        self._windows += 1
        if self._windows == self.FOLD:
            self.fold()

    def fold(self) -> None:
        """Move the kept losses into the exact sum (a sync on an accelerator)."""
        if not self._losses:
            return
        losses, counts = torch.stack(self._losses).tolist(), self._counts
        if set(map(type, counts)) != {int}:  # items counted by tensors: one copy for all
            counts = torch.stack([torch.as_tensor(c, dtype=torch.float64, device=self.device) for c in counts]).tolist()
        self.loss_sum.add_all(map(operator.mul, losses, counts))
        self.items = self.items + sum(counts)
        self._losses, self._counts, self._windows = [], [], 0

    def train_loss(self, epoch: int) -> float:
        """The epoch's ``train_loss`` over every rank's samples (or items): an all-reduce, on every rank."""
        self.fold()
        totals = torch.tensor([self.loss_sum.value, self.items, self.dropped], dtype=torch.float64, device=self.device)
        collectives.all_reduce(totals, group=self.data.group)
        total_loss, total_items, dropped = totals.tolist()
        if not total_items and dropped:
            logger.warning("every optimizer step of epoch %d was skipped (non-finite): train_loss is NaN", epoch)
            return float("nan")
        if not total_items:
            raise ValueError(
                f"the train loader yielded no batches in epoch {epoch} on any rank: an empty dataset, or a "
                "one-shot iterator (a generator) already used up by an earlier epoch; pass a loader that can be "
                "iterated again")
        return total_loss / total_items

    def state_dict(self) -> dict[str, Any]:
        self.fold()
        sums = self.loss_sum
        return {"loss_sum": sums.value, "items": float(self.items), "loss_partials": [*sums.partials, sums.special],
                **self.data.entry()}

    def load_rank_state_dicts(self, states: list[dict[str, Any]]) -> None:
        # older checkpoints carry the rounded loss_sum only
        terms_of = lambda state: state.get("loss_partials", [state["loss_sum"]])  # noqa: E731
        if same_layout(states, self.world_size, self.data):
            terms, items = terms_of(states[self.rank]), states[self.rank]["items"]
        elif self.data.rank == 0:  # on another layout only the epoch's global sums matter: data rank 0 carries
            shards = owners(states).values()  # them (one copy per shard, however many ranks shared it)
            terms, items = [term for state in shards for term in terms_of(state)], sum(s["items"] for s in shards)
        else:
            terms, items = [], 0
        self.reset()
        self.loss_sum = ExactSum(terms)
        self.items = int(items) if float(items).is_integer() else items
