"""Which data a rank reads, and with whom it counts samples: ``DataLayout``.

Under data parallelism every rank reads its own shard of the data. Under tensor parallelism the ranks
of one tensor-parallel group compute on the same batch together, so they read the same shard: the
data-parallel rank (``rank``) and the number of shards (``world_size``) are then those of the mesh's
"dp" dimension, and every sum that counts samples or items (the epoch's loss, evaluation, predict,
the item count of an accumulation window, per-rank checkpoint entries) must count each sample once,
not once per tensor-parallel rank. ``group`` is the process group of the ranks that read different
shards and include this one (None: every rank, the default group); ``replica`` says that a lower rank
of this rank's tensor-parallel group reads the same shard, so what this rank sums is a copy of its.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DataLayout:
    rank: int = 0
    world_size: int = 1
    group: Any = None
    replica: bool = False

    def entry(self) -> dict[str, Any]:
        """What a per-rank checkpoint entry records about its rank, to be read back on another layout."""
        return {"data_rank": self.rank, "data_world_size": self.world_size, "replica": self.replica}


def same_layout(states: list[dict[str, Any]], world_size: int, layout: DataLayout) -> bool:
    """Were ``states`` (one per saved rank) written by ranks laid out as these are? Entries written
    before layouts were recorded are data-parallel: saved rank i read shard i of len(states)."""
    return len(states) == world_size and all(
        state.get("data_world_size", len(states)) == layout.world_size for state in states)


def owners(states: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The saved entry of each data shard, by data-parallel rank: its first rank's (copies left out)."""
    found: dict[int, dict[str, Any]] = {}
    for index, state in enumerate(states):
        if not state.get("replica", False):
            found.setdefault(int(state.get("data_rank", index)), state)
    return found
