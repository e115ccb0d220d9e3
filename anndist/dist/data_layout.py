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


def same_layout(states: list[dict[str, Any] | None], world_size: int, layout: DataLayout) -> bool:
    """Were ``states`` (one per saved rank) written by ranks laid out as these are? Entries written
    before layouts were recorded are data-parallel: saved rank i read shard i of len(states). An entry
    a resume did not send this rank (None, see ``entries_read``) says nothing."""
    return len(states) == world_size and all(
        state.get("data_world_size", len(states)) == layout.world_size for state in states if state is not None)


def owner_indices(states: list[dict[str, Any] | None]) -> dict[int, int]:
    """The saved rank whose entry stands for each data shard, by data-parallel rank: its first rank
    (copies left out). Entries not sent to this rank (None) are skipped."""
    found: dict[int, int] = {}
    for index, state in enumerate(states):
        if state is not None and not state.get("replica", False):
            found.setdefault(int(state.get("data_rank", index)), index)
    return found


def owners(states: list[dict[str, Any] | None]) -> dict[int, dict[str, Any]]:
    """The saved entry of each data shard, by data-parallel rank: its first rank's (copies left out)."""
    return {shard: states[index] for shard, index in owner_indices(states).items()}  # type: ignore[misc]


def entries_read(states: list[dict[str, Any] | None], rank: int) -> set[int]:
    """On the layout that saved ``states`` (one entry of one kind per rank), the entries that rank
    ``rank`` restores from: its own (``EpochSums``, ``LoaderState``) and its data shard's owner's
    (``RNGState``: the ranks of a tensor-parallel group keep one stream). A resume sends a rank these
    and no others; a rank state that reads another entry on the same layout must be added here."""
    own = states[rank] or {}
    owner = owner_indices(states).get(int(own.get("data_rank", rank)))
    return {rank} if owner is None else {rank, owner}
