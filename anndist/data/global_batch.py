"""The global batch as the unit (``Trainer(global_batch_size=N)``): the same samples in the same
optimizer steps on any number of data-parallel ranks.

A step takes N samples over the W data-parallel ranks, each reading micro-batches of the loader's
batch size B, so K = N / (B * W) micro-batches per rank (``accumulation_steps``). The epoch has one
global order, the permutation ``DistributedSampler`` draws (seed + epoch), padded with nothing, and
``GlobalBatchSampler`` gives every rank its part of it:

- optimizer step w of the epoch takes positions ``[w*N, (w+1)*N)`` of the order, on any W;
- a step's positions are cut into pieces of B consecutive positions, and piece p is micro-batch
  ``p // W`` of rank ``p % W``. The pieces do not depend on W, so neither does any micro-batch's
  content: only which rank computes it, and when (``EpochShape.piece`` numbers them, which is what
  makes the forward's randomness a function of the piece, ``seed.micro_batch_seed``);
- the epoch's last step holds the S = n - w*N samples left (``drop_last`` drops it). Every rank needs
  the same number m of micro-batches in it (FSDP's forward is a collective), so S is cut into
  ``W * m`` pieces: pieces of B as above when ``ceil(S / B)`` is a multiple of W (then the step is the
  same on any W), else near-equal pieces (the same samples, grouped by W: the step's gradient is the
  same up to rounding, its dropout masks are not). Fewer samples than pieces (S < W, or B = 1) cannot
  be split without repeating: that step repeats ``W * m - S`` of its samples, with a warning.

A resume on another W continues at the same step: a checkpoint is taken between steps, after w whole
steps, which is micro-batch ``w * K`` of every rank for any W (``TrainState`` rescales).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


def accumulation_steps(global_batch: int | None, explicit: int | None, loader: Any, data_world_size: int) -> int:
    """K, the micro-batches per rank of one optimizer step: ``explicit`` (default 1) without a global
    batch, else ``global_batch / (batch_size * data_world_size)``, which must be a whole number."""
    if global_batch is None:
        return explicit or 1
    batch = getattr(loader, "batch_size", None)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(
            f"global_batch_size={global_batch} needs the train loader's batch size to count micro-batches, and "
            f"{type(loader).__name__} has batch_size={batch!r}; pass a DataLoader(..., batch_size=B), or "
            "gradient_accumulation_steps=K instead of global_batch_size")
    per_round = batch * data_world_size
    k, rest = divmod(global_batch, per_round)
    if rest or not k:
        raise ValueError(
            f"global_batch_size={global_batch} cannot be split into micro-batches of batch_size={batch} on "
            f"{data_world_size} data-parallel rank(s): it must be a multiple of {batch} x {data_world_size} = "
            f"{per_round}; pass global_batch_size={per_round * max(1, round(global_batch / per_round))}"
            + _batch_sizes_that_fit(global_batch, batch, data_world_size))
    if explicit is not None and explicit != k:
        raise ValueError(
            f"gradient_accumulation_steps={explicit} contradicts global_batch_size={global_batch}: with batch_size="
            f"{batch} on {data_world_size} data-parallel rank(s) a step takes {global_batch} / ({batch} x "
            f"{data_world_size}) = {k} micro-batches per rank; pass only global_batch_size (K follows from it)")
    return k


def _batch_sizes_that_fit(global_batch: int, batch: int, data_world_size: int) -> str:
    """The advice's second half: loader batch sizes near ``batch`` that split ``global_batch``."""
    per_rank, rest = divmod(global_batch, data_world_size)
    if rest or not per_rank:
        return f"; no batch_size splits {global_batch}: it must also be a multiple of the {data_world_size} ranks"
    divisors = {d for i in range(1, math.isqrt(per_rank) + 1) if per_rank % i == 0 for d in (i, per_rank // i)}
    return f", or a batch_size among {sorted(sorted(divisors, key=lambda d: abs(d - batch))[:4])}"


@dataclass(frozen=True)
class EpochShape:
    """What the step needs to know of an epoch's windows before it starts (``TrainStep.begin_epoch``).

    ``nominal_batch``: the loader's batch size (None when unknown); with a global batch also the
    windows left in the epoch, the factor of its last window (``N / samples`` in it: the gradient is
    then the mean over those samples on any W), and how to number this rank's micro-batches.
    """

    nominal_batch: int | None
    windows: int = 0
    last_correction: float = 1.0
    epoch: int = 0
    first_batch: int = 0
    data_rank: int = 0
    data_world_size: int = 1

    def piece(self, batch_idx: int, k: int) -> int:
        """The number of the piece this rank's micro-batch ``batch_idx`` holds within the epoch (module
        docstring): the same piece of the global order has the same number on any W."""
        window, j = divmod(batch_idx, k)
        return (window * k + j) * self.data_world_size + self.data_rank


def epoch_shape(loader: Any, epoch: int, first_batch: int) -> EpochShape:
    """The shape of ``epoch`` as read from ``loader`` from micro-batch ``first_batch`` on."""
    sampler = getattr(loader, "batch_sampler", None)
    if not isinstance(sampler, GlobalBatchSampler):
        return EpochShape(getattr(loader, "batch_size", None))
    windows, tail = sampler.num_windows(), sampler.tail_sizes()
    last = sampler.global_batch / sum(tail) if tail else 1.0
    return EpochShape(sampler.batch_size, max(0, windows - first_batch // sampler.k), last, epoch, first_batch,
                      sampler.rank, sampler.num_replicas)


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches (lists of dataset indices) of the global order (module docstring)."""

    def __init__(self, dataset_len: int, global_batch: int, batch_size: int, num_replicas: int, rank: int,
                 shuffle: bool, seed: int, drop_last: bool = False) -> None:
        self.n, self.global_batch, self.batch_size = dataset_len, global_batch, batch_size
        self.num_replicas, self.rank, self.shuffle, self.seed, self.drop_last = num_replicas, rank, shuffle, seed, drop_last
        self.k = accumulation_steps(global_batch, None, self, num_replicas)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def set_start(self, batches: int) -> None:
        """Begin the next epoch's iterator at this rank's micro-batch ``batches`` (a whole number of steps;
        past the end means the epoch is done)."""
        self.start = min(batches, self.batches_per_epoch())

    def num_windows(self) -> int:
        full, rest = divmod(self.n, self.global_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def tail_sizes(self) -> list[int]:
        """The sizes of the pieces of the epoch's last, short step (empty when there is none)."""
        rest = self.n % self.global_batch
        if not rest or self.drop_last:
            return []
        pieces = math.ceil(rest / self.batch_size)
        count = self.num_replicas * math.ceil(pieces / self.num_replicas)
        if count == pieces:
            return [self.batch_size] * (pieces - 1) + [rest - self.batch_size * (pieces - 1)]
        if rest < count:  # one sample per piece, and some samples twice
            return [1] * count
        size, larger = divmod(rest, count)
        return [size + 1] * larger + [size] * (count - larger)

    def batches_per_epoch(self) -> int:
        tail = self.tail_sizes()
        return (self.n // self.global_batch) * self.k + len(tail) // self.num_replicas

    def order(self) -> torch.Tensor:
        """The epoch's global order: ``DistributedSampler``'s permutation, unpadded."""
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        order, full = self.order(), self.n // self.global_batch
        tail = self.tail_sizes()
        if len(tail) > self.n % self.global_batch:
            logger.warning("the last optimizer step of epoch %d holds %d sample(s), fewer than its %d micro-batches "
                           "on %d rank(s): %d of them are trained twice in it", self.epoch,
                           self.n % self.global_batch, len(tail), self.num_replicas, len(tail) - self.n % self.global_batch)
        for batch in range(self.start, self.batches_per_epoch()):
            window, j = divmod(batch, self.k)
            piece = j * self.num_replicas + self.rank
            begin = window * self.global_batch
            if window < full:
                yield order[begin + piece * self.batch_size:begin + (piece + 1) * self.batch_size].tolist()
            else:
                yield self._tail_piece(order[begin:], tail, piece)

    @staticmethod
    def _tail_piece(rest: torch.Tensor, sizes: list[int], piece: int) -> list[int]:
        if len(sizes) > len(rest):  # one sample per piece, the first ones repeated
            return [int(rest[piece % len(rest)])]
        offset = sum(sizes[:piece])
        return rest[offset:offset + sizes[piece]].tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start
