"""Evaluation batches in lockstep across ranks, for a sharded (FSDP) model.

Under FSDP every forward all-gathers parameters, a collective: every rank must run the model the same
number of times. Each rank evaluates its unpadded shard of the eval set, and shards can differ by a
batch, so a rank with fewer batches would leave the others waiting forever in their next forward.
``lockstep(loader, device)`` yields ``(batch, counts)``: this rank's own batches
(``counts`` True), then, until every rank is done, filler batches (``counts`` False) that run the same
forward only to take part in the all-gathers; their outputs are discarded, so every sample still
counts exactly once.

How the ranks agree on the number of forwards:

* a ``DataLoader`` over a map-style dataset knows its length: one MAX all-reduce up front;
* any other iterable: before each forward, a MAX all-reduce of "I still have a batch".

The filler is the rank's last batch. A rank with no batch at all takes the dataset's first sample,
read and collated as the loader reads, from a map-style ``DataLoader``; from anything else it has
nothing to run, and every rank raises a ValueError naming it. The strategy decides when lockstep is
needed (``Strategy.eval_batches``): a model whose forward runs no collective reads the loader as it is.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

from ..dist import collectives

_END = object()


def lockstep(loader: Iterable, device: torch.device) -> Iterator[tuple[Any, bool]]:
    """``(batch, counts)`` pairs, the same number on every rank."""
    length = _length(loader)
    return _by_length(loader, length, device) if length is not None else _by_flags(loader, device)


def _length(loader: Iterable) -> int | None:
    """``len(loader)`` where it is exact: a DataLoader over a map-style dataset whose sampler has a length."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    try:
        return len(loader)
    except TypeError:
        return None


def _by_length(loader: DataLoader, own: int, device: torch.device) -> Iterator[tuple[Any, bool]]:
    """One all-reduce of the loader lengths, then every rank runs the longest one's number of forwards."""
    filler = _first_sample(loader) if own == 0 else _END
    stuck = own == 0 and filler is _END  # no batch, and no sample to make a filler of
    total, any_stuck = _max(device, own, stuck)
    if total and any_stuck:
        _refuse(stuck)
    seen = 0
    for filler in loader:
        seen += 1
        yield filler, True
    for _ in range(total - seen):
        yield filler, False


def _by_flags(loader: Iterable, device: torch.device) -> Iterator[tuple[Any, bool]]:
    """Before each forward, the ranks agree whether any of them still has a batch."""
    batches, last, done = iter(loader), _END, False
    while True:
        batch = _END if done else next(batches, _END)
        done = batch is _END
        stuck = done and last is _END
        any_left, any_stuck = _max(device, not done, stuck)
        if not any_left:
            return
        if any_stuck:
            _refuse(stuck)
        if done:
            yield last, False
        else:
            last = batch
            yield batch, True


def _max(device: torch.device, *flags: int) -> list[int]:
    values = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=device)
    collectives.all_reduce(values, op=dist.ReduceOp.MAX)
    return [int(v) for v in values.tolist()]


def _first_sample(loader: DataLoader) -> Any:
    """The dataset's first sample as a batch, or ``_END`` when the dataset has none; read the way
    the loader's own fetcher reads it."""
    dataset = loader.dataset
    read_batch = getattr(dataset, "__getitems__", None)
    try:
        if loader.batch_sampler is None:  # no automatic batching: each sample is collated alone
            data = dataset[0]
        elif callable(read_batch):  # a dataset that reads whole batches (batched_reads.py)
            data = read_batch([0])
        else:
            data = [dataset[0]]
    except (IndexError, KeyError):
        return _END
    return loader.collate_fn(data)


def _refuse(stuck: bool) -> None:
    """Every rank raises (the others would wait in a forward for the rank that has nothing to run)."""
    ranks = [rank for rank, s in enumerate(collectives.all_gather_object(stuck)) if s]
    raise ValueError(
        f"evaluate()/predict() with strategy='fsdp': rank(s) {ranks} got no batch from the evaluation loader, "
        "and every rank must run the sharded model as often as the others (each forward all-gathers its "
        "parameters); give every rank at least one batch, or pass a DataLoader over a map-style dataset "
        "(anndist shards it, and a rank left without a batch runs a filler from its first sample)")
