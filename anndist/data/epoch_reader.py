"""How an epoch's micro-batches are read, and where each accumulation window ends.

Two ways, chosen per loader when ``fit`` starts:

- **Equal shards** (a loader anndist rebuilt with its distributed sampler, or one process): every
  rank reads the same number of batches, so one batch of look-ahead is enough to know the epoch's
  last micro-batch, which must end (and synchronise) its window even when the window is short.
  On CUDA that look-ahead also copies the next batch to the GPU while the current one computes
  (``prefetch.py``).
- **Windows with an agreed end** (streams, ``IterableDataset``s, generators, lists, stateful loaders:
  anything that decides its own shards, whose lengths may differ between ranks): each window's
  micro-batches are fetched before it starts, and with several ranks one small all-reduce (MIN)
  of the number fetched makes every rank use the same number. A rank that ran out ends the epoch for
  all at the same step, with no hang and no mismatched collective; the batches other ranks had
  fetched beyond that point are dropped (at most one window's worth per rank, logged). Fetching no
  further than the current window also means a stateful loader's ``state_dict()`` at a window's end
  counts exactly the batches trained.

Windows end where ``(batch index + 1) % K == 0``, or at the epoch's (agreed) last micro-batch.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from ..dist import collectives
from .prefetch import ahead

logger = logging.getLogger(__name__)


def micro_batches(batches: Iterator, k: int, first_idx: int, equal_shards: bool,
                  device: torch.device) -> Iterator[tuple[Any, bool]]:
    """``(batch, ends)`` for one epoch's iterator whose first batch has index ``first_idx``: a window
    ends at batch ``batch_idx`` where ``ends or (batch_idx + 1) % k == 0`` (the caller numbers them,
    so the usual path is one generator, ``ahead``'s, per micro-batch)."""
    if equal_shards:
        return ahead(batches, device)  # ends: the epoch's last batch
    return _agreed_windows(batches, k, first_idx, device)


def _agreed_windows(iterator: Iterator, k: int, batch_idx: int, device: torch.device) -> Iterator[tuple[Any, bool]]:
    agree = collectives.world_size() > 1
    while True:
        wanted = k - batch_idx % k
        window = _take(iterator, wanted)
        usable = _agreed_count(len(window), device) if agree else len(window)
        if usable == 0 and batch_idx == 0 and agree:  # nothing at all this epoch: an empty shard is an error
            _name_empty_ranks(len(window), device)
        if usable < len(window):
            logger.warning("another rank's data ended first: %d fetched batch(es) of this rank end unused "
                           "(streams of unequal length end together at the same step)", len(window) - usable)
        for offset, batch in enumerate(window[:usable]):
            yield batch, offset == usable - 1
            batch_idx += 1
        if usable < wanted:
            return


def _take(iterator: Iterator, n: int) -> list[Any]:
    taken = []
    for _ in range(n):
        try:
            taken.append(next(iterator))
        except StopIteration:
            break
    return taken


def _agreed_count(count: int, device: torch.device) -> int:
    value = torch.tensor([count], dtype=torch.int64, device=device)
    collectives.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


def _name_empty_ranks(count: int, device: torch.device) -> None:
    """Raise on every rank, naming the ranks whose data was empty from the epoch's start, when others had
    some (an epoch every rank starts empty is the caller's "no batches on any rank"). Runs only then."""
    counts = torch.zeros(collectives.world_size(), dtype=torch.int64, device=device)
    counts[collectives.rank()] = count
    collectives.all_reduce(counts)
    empty = [r for r, c in enumerate(counts.tolist()) if c == 0]
    if len(empty) < len(counts):
        have = [r for r in range(len(counts)) if r not in empty]
        raise ValueError(
            f"the train loader of rank(s) {empty} yielded no batch at the start of this epoch, while rank(s) {have} "
            "had some: every rank stops with the one that runs out, so nothing would be trained; give every rank "
            "a non-empty shard (a stream split into at least as many shards as ranks, each with data)")


def epoch_position(loader: Iterable, skip: int) -> dict[str, int | None]:
    """Where an epoch starts: its first batch index and its batch count (None when unknown)."""
    try:
        remaining = len(loader)  # type: ignore[arg-type]
    except TypeError:
        remaining = None
    return {"first_batch": skip, "num_batches": None if remaining is None else skip + remaining}
