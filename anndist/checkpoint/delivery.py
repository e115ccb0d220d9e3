"""A checkpoint read once, on rank 0, delivered to every rank: what each rank restores, and no more.

A resume used to have every rank read the whole file (and the ``ranks`` entries of every other
rank): N reads of the checkpoint from the shared file system, each rank holding every rank's RNG
streams. Here rank 0 reads and checks it once; the shared states (model, optimizer, scheduler,
progress, callbacks) reach the others by broadcast (``dist/state_broadcast.py``: each rank receives
them once, as it would have read them), and of the per-rank entries each rank receives the ones it
restores from (``data_layout.entries_read``: its own, and its data shard's first rank's), by scatter.
A resume on another shape of the job (another world size or layout), where the entries are combined,
sends every rank every entry (once per reshape; what each rank then receives grows with the ranks
that saved).
"""
from __future__ import annotations

from typing import Any

from ..dist import collectives
from ..dist.data_layout import entries_read, same_layout
from ..dist.state_broadcast import broadcast_tree


def deliver(payload: dict[str, Any] | None, world_size: int, layout: Any) -> dict[str, Any]:
    """Rank 0's ``payload`` (read there; None elsewhere) on every rank, its ``ranks`` list cut to what each
    rank restores: entries it does not read are None (``len`` stays the saved world size). ``layout``:
    this rank's data layout (rank 0's decides whether the job has the shape that saved)."""
    if not (collectives.is_initialized() and collectives.world_size() > 1):
        return payload  # type: ignore[return-value]
    main = collectives.rank() == 0
    ranks = payload["ranks"] if main else None
    same = main and _same_shape(ranks, world_size, layout)
    head = {"payload": {k: v for k, v in payload.items() if k != "ranks"}, "same": same,
            "saved": len(ranks)} if main else None
    head = broadcast_tree(head)
    if not head["same"]:
        return {**head["payload"], "ranks": broadcast_tree(ranks)}
    mine = collectives.scatter_object([_entries_for(ranks, r) for r in range(world_size)] if main else None)
    return {**head["payload"], "ranks": [mine.get(i) for i in range(head["saved"])]}


def _same_shape(ranks: list[dict[str, Any]], world_size: int, layout: Any) -> bool:
    names = set().union(*ranks) if ranks else set()
    return len(ranks) == world_size and all(same_layout(_kind(ranks, name), world_size, layout) for name in names)


def _kind(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any] | None]:
    return [None if entry is None else entry.get(name, {}) for entry in ranks]


def _entries_for(ranks: list[dict[str, Any]], rank: int) -> dict[int, dict[str, Any]]:
    wanted = set().union(*(entries_read(_kind(ranks, name), rank) for name in ranks[rank]))
    return {index: ranks[index] for index in wanted | {rank}}
