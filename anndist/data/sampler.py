"""Sharding loaders across ranks: the resumable sampler and the rules for rebuilding loaders.

Train loaders whose sampler is torch's ``SequentialSampler``, ``RandomSampler`` or
``DistributedSampler`` are rebuilt with :class:`ResumableDistributedSampler` (same batch size,
collate_fn, workers, pin_memory, drop_last; shuffle kept; a ``TensorDataset`` is read a batch at a
time, ``batched_reads.py``). Anything else (a custom sampler or batch sampler, an
``IterableDataset``) already decides what each rank reads and is left alone.
Evaluation loaders are rebuilt with :class:`ShardSampler`, which pads nothing, so every sample of
the dataset counts exactly once.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from torch.utils.data import RandomSampler, Sampler, SequentialSampler

from .batched_reads import batched_reads
from .global_batch import GlobalBatchSampler
from ..seed import loader_seed


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch part-way through without reading the skipped samples.

    ``set_start_index(i)`` makes the next epoch's iterator begin at this rank's i-th index; it is
    reset by ``set_epoch``, so a resumed epoch is the only short one.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        self.start_index = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start_index = 0

    def set_start_index(self, index: int) -> None:
        if not 0 <= index <= self.num_samples:
            raise ValueError(f"start index {index} is outside this rank's {self.num_samples} samples")
        self.start_index = index

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``W`` reads indices ``r, r+W, r+2W, ...``: no padding, no duplicates."""

    def __init__(self, dataset_len: int, num_replicas: int, rank: int) -> None:
        self.indices = range(rank, dataset_len, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def is_rebuildable(loader: DataLoader) -> bool:
    """True when the loader's sampler is one of torch's stock samplers, so we may replace it."""
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        return False
    return type(loader.sampler) in (SequentialSampler, RandomSampler, DistributedSampler,
                                    ResumableDistributedSampler)


def _shuffles(loader: DataLoader) -> bool:
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        return sampler.shuffle
    return isinstance(sampler, RandomSampler)


def _rebuild(loader: DataLoader, sampler: Sampler, generator: torch.Generator | None) -> DataLoader:
    dataset, collate_fn = batched_reads(loader.dataset, loader.collate_fn)  # in-memory data: whole batches
    # A batch sampler decides the batches itself: no batch_size, sampler or drop_last beside it.
    batching = ({"batch_sampler": sampler} if isinstance(sampler, GlobalBatchSampler) else
                {"batch_size": loader.batch_size, "sampler": sampler, "drop_last": loader.drop_last})
    return DataLoader(
        dataset,
        **batching,
        num_workers=loader.num_workers,
        collate_fn=collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
    )


def shard_train_loader(loader: DataLoader, world_size: int, rank: int, seed: int,
                       global_batch: int | None = None) -> DataLoader:
    """A copy of ``loader`` that reads this rank's shard through a resumable sampler (with a global
    batch: this rank's micro-batches of the epoch's global order, ``global_batch.py``)."""
    if global_batch is not None:
        sampler: Sampler = GlobalBatchSampler(len(loader.dataset), global_batch, loader.batch_size, world_size, rank,
                                              _shuffles(loader), seed, loader.drop_last)
    else:
        sampler = ResumableDistributedSampler(loader.dataset, num_replicas=world_size, rank=rank,
                                              shuffle=_shuffles(loader), seed=seed, drop_last=False)
    return _rebuild(loader, sampler, torch.Generator())


def shard_eval_loader(loader: DataLoader, world_size: int, rank: int) -> DataLoader:
    """A copy of ``loader`` that reads this rank's unpadded shard, in dataset order."""
    sampler = ShardSampler(len(loader.dataset), world_size, rank)
    return _rebuild(loader, sampler, loader.generator)


def start_epoch(loader: DataLoader, epoch: int, seed: int, rank: int, skip: int = 0) -> None:
    """Prepare ``loader`` for ``epoch``: sampler epoch, resume offset (``skip`` micro-batches), and the
    workers' seed."""
    sampler = loader.sampler
    if isinstance(loader.batch_sampler, GlobalBatchSampler):
        loader.batch_sampler.set_epoch(epoch)
        loader.batch_sampler.set_start(skip)
        sampler = loader.batch_sampler
    elif isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    if isinstance(sampler, ResumableDistributedSampler):
        # A checkpoint taken after the epoch's last (short) batch counts a whole batch for it.
        sampler.set_start_index(min(skip * (loader.batch_size or 0), sampler.num_samples))
    elif skip and not isinstance(sampler, GlobalBatchSampler):
        raise RuntimeError(
            "cannot resume mid-epoch: the train loader's sampler is not anndist's resumable sampler; "
            "keep rebuild_train_loader=True or checkpoint at epoch ends only"
        )
    # Workers draw their base seed from loader.generator: make it a function of (seed, rank, epoch).
    if loader.generator is not None and isinstance(sampler, (ResumableDistributedSampler, GlobalBatchSampler)):
        loader.generator.manual_seed(loader_seed(seed, rank, epoch))
