"""Saving and loading a run's state, called on **every rank**.

A run's state is a set of objects with ``state_dict()``/``load_state_dict()``, in the manner of
torchtitan's ``CheckpointManager(states=...)``; this module sees nothing else. ``RunState.states`` are
the same on every rank and rank 0's copy is saved. ``RunState.rank_states`` are each rank's own (RNG
streams, partial sums): every rank's copy is saved, in rank order, and on load each object receives
the list of all saved copies (``load_rank_state_dicts``) and takes what it needs, which is also how
a resume on another number of ranks works.

Save: gather the rank states to rank 0; build the payload; rank 0 writes it atomically and then runs
``publish(path)`` (the ``latest`` pointer, aliases, pruning); then the ranks compare notes
(``run_collectively``): that is the barrier, and it turns a failed write on rank 0 into an error on
every rank instead of a hang. Load: every rank reads the file, checks every state before changing
anything, then restores its objects.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from ..dist import arrival, collectives
from .file import CheckpointError, DamagedCheckpointError, read_checkpoint, write_checkpoint
from .payload import build, check_metadata, upgrade, warn_versions
from . import sharded as sharded_ckpt
from .sharded import ShardedStates

logger = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class RankStateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_rank_state_dicts(self, states: list[dict[str, Any]]) -> None: ...


@dataclass
class RunState:
    """What a checkpoint holds, as objects. ``ready_to_save`` raises when a save now would lose work."""

    states: dict[str, Stateful]
    rank_states: dict[str, RankStateful] = field(default_factory=dict)
    ready_to_save: Callable[[], None] = lambda: None
    sharded: ShardedStates | None = None  # states DCP saves, each rank its part, in a folder (sharded.py)

    def payload_states(self, folder: bool) -> dict[str, Stateful]:
        """The shared states a checkpoint's payload holds: in a DCP folder, all but those DCP writes."""
        if not folder or self.sharded is None:
            return self.states
        return {name: obj for name, obj in self.states.items() if name not in self.sharded.states}


def save(path: str | os.PathLike, run: RunState, metadata: dict[str, Any],
         publish: Callable[[Path], None] | None = None) -> Path:
    """Write ``run`` to ``path`` (rank 0, atomically), then ``publish(path)`` on rank 0; every rank returns the path."""
    path = Path(path)
    check_metadata(metadata)
    run.ready_to_save()
    check_every_rank_saves()
    ranks = collectives.all_gather_object({name: obj.state_dict() for name, obj in run.rank_states.items()})
    folder = run.sharded is not None and run.sharded.saves_folders
    # Every rank builds the states: a state_dict() may itself be collective.
    payload = build({name: obj.state_dict() for name, obj in run.payload_states(folder).items()}, ranks, metadata)
    if folder:
        return sharded_ckpt.save(path, run.sharded, payload, publish)
    writes = collectives.rank() == 0

    def write() -> None:
        if writes:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_checkpoint(path, payload)
            if publish is not None:
                publish(path)

    collectives.run_collectively(write)
    return path


ARRIVAL_TIMEOUT = 30.0  # seconds; the ranks reach a save at the same step, so a straggler is seconds late
_saves = 0  # saves this process has begun: the same count on every rank while every rank saves


def check_every_rank_saves() -> None:
    """Raise within ``ARRIVAL_TIMEOUT`` (not the full ``dist_timeout``) when a rank never comes to this save.

    Each rank posts its arrival at save number N to the group's store and waits for the others'; the
    usual cause of a missing rank is ``if trainer.is_main_process: trainer.save_checkpoint(...)``.
    """
    global _saves
    _saves += 1
    store, world = arrival.default_store(), collectives.world_size()
    if store is None or world == 1:
        return
    prefix, rank = f"anndist/save{_saves}", collectives.rank()
    arrival.post(store, prefix, rank)
    timeout = min(ARRIVAL_TIMEOUT, store.timeout.total_seconds())
    missing = arrival.missing_ranks(store, prefix, world, timeout)
    if missing:
        present = [r for r in range(world) if r not in missing]
        raise RuntimeError(
            f"save_checkpoint() was called on rank(s) {present} only: rank(s) {missing} did not reach it within "
            f"{timeout:.0f} s. It runs on every rank (rank 0 writes, the others send their RNG state and partial "
            "sums); call it outside `if trainer.is_main_process:`")


SHARED_ERRORS = (DamagedCheckpointError, CheckpointError)  # every rank raises the same one: a resume can fall back


def load(path: str | os.PathLike, run: RunState) -> dict[str, Any]:
    """Restore ``run`` from ``path`` on every rank (each rank its own rank states); return the metadata."""
    path = Path(path)
    if sharded_ckpt.is_sharded(path):
        return _load_sharded(path, run)
    only_in_folders = sorted(set(run.sharded.states) - set(run.states)) if run.sharded is not None else []
    if only_in_folders:  # they would silently keep their current values
        raise CheckpointError(
            f"checkpoint {path} is a single file (written by a strategy='ddp' run); this run keeps its "
            f"{only_in_folders} in sharded checkpoint folders only (strategy='fsdp'): continue that run with "
            "strategy='ddp', whose async_checkpoint=True saves folders that strategy='fsdp' loads")
    return collectives.run_collectively(lambda: _restore(run, upgrade(read_checkpoint(path)), str(path), False),
                                        share=SHARED_ERRORS)


def _load_sharded(path: Path, run: RunState) -> dict[str, Any]:
    if run.sharded is None:
        raise CheckpointError(f"checkpoint {path} is a sharded (DCP) folder and this run has no states DCP can load; "
                              "turn it into one file with python -m anndist.consolidate")
    payload, index = collectives.run_collectively(lambda: sharded_ckpt.read_run_file(path), share=SHARED_ERRORS)
    sharded_ckpt.load(path, run.sharded, index)  # collective: outside run_collectively, which must not wrap one
    return collectives.run_collectively(lambda: _restore(run, upgrade(payload), str(path), True))


def _restore(run: RunState, payload: dict[str, Any], source: str, folder: bool) -> dict[str, Any]:
    """Restore the payload's states (those DCP did not load from a ``folder``) and every rank's own."""
    saved, ranks, states = payload["states"], payload["ranks"], run.payload_states(folder)
    missing = sorted(set(states) - set(saved)) + sorted(set(run.rank_states) - set(ranks[0] if ranks else {}))
    if missing:
        raise CheckpointError(f"checkpoint {source} holds no state for {missing}; it was saved by another kind of run")
    for name, obj in states.items():  # check everything before changing anything
        check = getattr(obj, "check_state_dict", None)
        if check is not None:
            check(saved[name], source)
    try:
        for name, obj in states.items():
            obj.load_state_dict(saved[name])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {source} does not fit this Trainer's model/optimizer: {exc}") from exc
    for name, obj in run.rank_states.items():
        obj.load_rank_state_dicts([rank[name] for rank in ranks])
    warn_versions(payload.get("versions", {}), source)
    return dict(payload.get("metadata", {}))
