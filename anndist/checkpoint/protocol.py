"""Saving and loading a run's state, called on **every rank**.

A run's state is a set of objects with ``state_dict()``/``load_state_dict()``, in the manner of
torchtitan's ``CheckpointManager(states=...)``; this module sees nothing else. ``RunState.states`` are
the same on every rank and rank 0's copy is saved. ``RunState.rank_states`` are each rank's own (RNG
streams, partial sums): every rank's copy is saved, in rank order, and on load each object receives
the list of saved copies (``load_rank_state_dicts``) and takes what it needs, which is also how a
resume on another number of ranks works.

Save: the rank states go to rank 0 alone (a gather: the writer is the only rank that needs them);
rank 0 writes the payload atomically and then runs ``publish(path)`` (the ``latest`` pointer,
aliases, pruning); then the ranks compare notes (``run_collectively``): that is the barrier, and it
turns a failed write on rank 0 into an error on every rank instead of a hang. Load: rank 0 reads
the file once, checking it as it reads; every rank receives what it restores (``delivery.py``),
checks every state before changing anything, then restores its objects. A DCP folder's shards are
read by the ranks that hold them (sharded states), or by rank 0 and broadcast (replicated ones).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from ..dist import arrival, collectives
from ..dist.data_layout import DataLayout
from ..dist.state_broadcast import broadcast_tree
from .delivery import deliver
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

    @property
    def replicated(self) -> bool:
        """Whether the states DCP saves are the same on every rank (DDP keeps them among ``states`` too)."""
        return self.sharded is not None and set(self.sharded.states) <= set(self.states)

    def data_layout(self) -> DataLayout:
        """The data layout this rank's entries record (its rank states carry the strategy's as ``data``)."""
        layouts = (getattr(obj, "data", None) for obj in self.rank_states.values())
        return next((d for d in layouts if isinstance(d, DataLayout)),
                    DataLayout(collectives.rank(), collectives.world_size()))


def save(path: str | os.PathLike, run: RunState, metadata: dict[str, Any],
         publish: Callable[[Path], None] | None = None) -> Path:
    """Write ``run`` to ``path`` (rank 0, atomically), then ``publish(path)`` on rank 0; every rank returns the path."""
    path = Path(path)
    check_metadata(metadata)
    run.ready_to_save()
    check_every_rank_saves()
    # Only the writer needs every rank's own states: they go to rank 0 alone.
    ranks = collectives.gather_object({name: obj.state_dict() for name, obj in run.rank_states.items()}) or []
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

    Each rank posts its arrival at save number N to the group's store and waits for the others' (a few
    store operations per rank, the keys deleted once every rank is through: ``dist/arrival.py``); the
    usual cause of a missing rank is ``if trainer.is_main_process: trainer.save_checkpoint(...)``.
    """
    global _saves
    _saves += 1
    store, world = arrival.default_store(), collectives.world_size()
    if store is None or world == 1:
        return
    timeout = min(ARRIVAL_TIMEOUT, store.timeout.total_seconds())
    missing = arrival.missing_ranks(store, f"anndist/save{_saves}", collectives.rank(), world, timeout)
    if missing:
        present = [r for r in range(world) if r not in missing]
        raise RuntimeError(
            f"save_checkpoint() was called on rank(s) {present} only: rank(s) {missing} did not reach it within "
            f"{timeout:.0f} s. It runs on every rank (rank 0 writes, the others send their RNG state and partial "
            "sums); call it outside `if trainer.is_main_process:`")


SHARED_ERRORS = (DamagedCheckpointError, CheckpointError)  # every rank raises the same one: a resume can fall back
READ_ERRORS = (*SHARED_ERRORS, FileNotFoundError, IsADirectoryError)  # rank 0 reads; every rank names the problem


def load(path: str | os.PathLike, run: RunState) -> dict[str, Any]:
    """Restore ``run`` from ``path`` on every rank (each rank its own rank states); return the metadata."""
    path = Path(path)
    main = collectives.rank() == 0
    if collectives.broadcast_object(sharded_ckpt.is_sharded(path) if main else None):
        return _load_sharded(path, run)
    only_in_folders = sorted(set(run.sharded.states) - set(run.states)) if run.sharded is not None else []
    if only_in_folders:  # they would silently keep their current values
        raise CheckpointError(
            f"checkpoint {path} is a single file (written by a strategy='ddp' run); this run keeps its "
            f"{only_in_folders} in sharded checkpoint folders only (strategy='fsdp'): continue that run with "
            "strategy='ddp', whose async_checkpoint=True saves folders that strategy='fsdp' loads")
    read = collectives.run_collectively(lambda: upgrade(read_checkpoint(path)) if main else None, share=READ_ERRORS)
    payload = deliver(read, collectives.world_size(), run.data_layout())
    return collectives.run_collectively(lambda: _restore(run, payload, str(path), False), share=SHARED_ERRORS)


def _load_sharded(path: Path, run: RunState) -> dict[str, Any]:
    if run.sharded is None:
        raise CheckpointError(f"checkpoint {path} is a sharded (DCP) folder and this run has no states DCP can load; "
                              "turn it into one file with python -m anndist.consolidate")
    run.sharded.wait()
    main = collectives.rank() == 0
    read = collectives.run_collectively(lambda: sharded_ckpt.read_run_file(path) if main else (None, None),
                                        share=READ_ERRORS)
    payload, index = read
    if run.replicated:  # rank 0 reads the whole states, the others receive them
        collectives.run_collectively(lambda: sharded_ckpt.load_alone(path, run.sharded, index) if main else None,
                                     share=SHARED_ERRORS)
        _share_states({name: run.states[name] for name in run.sharded.states})
    else:  # collective: outside run_collectively, which must not wrap one
        sharded_ckpt.load(path, run.sharded, collectives.broadcast_object(index))
    payload = deliver(upgrade(payload) if main else None, collectives.world_size(), run.data_layout())
    return collectives.run_collectively(lambda: _restore(run, payload, str(path), True))


def _share_states(states: dict[str, Stateful]) -> None:
    """Rank 0's ``states`` (loaded there) given to the other ranks' objects."""
    main = collectives.rank() == 0
    tree = broadcast_tree({name: obj.state_dict() for name, obj in states.items()} if main else None)
    if not main:
        for name, obj in states.items():
            obj.load_state_dict(tree[name])


def _restore(run: RunState, payload: dict[str, Any], source: str, folder: bool) -> dict[str, Any]:
    """Restore the payload's states (those DCP did not load from a ``folder``) and every rank's own."""
    saved, ranks, states = payload["states"], payload["ranks"], run.payload_states(folder)
    any_entry = next((entry for entry in ranks if entry is not None), {})  # the entries this rank was sent
    missing = sorted(set(states) - set(saved)) + sorted(set(run.rank_states) - set(any_entry))
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
        obj.load_rank_state_dicts([None if entry is None else entry[name] for entry in ranks])
    warn_versions(payload.get("versions", {}), source)
    return dict(payload.get("metadata", {}))
