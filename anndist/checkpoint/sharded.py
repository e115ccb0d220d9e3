"""Sharded checkpoints: a folder written by ``torch.distributed.checkpoint`` (DCP), every rank its own part.

    step-000000010.ckpt/        a folder (the name is the one a single-file checkpoint would have)
        __0_0.distcp ...        one file per rank: its shards of the model and optimizer state
        .metadata               DCP's index of the shards (what lets another world size reshard on load)
        run.ckpt                the run's other state (payload.py: train_state, every rank's RNG,
                                scheduler, callbacks, ...), written by rank 0 with file.py

The commit: everything is written under ``.<name>.partial.tmp``. DCP fsyncs each file, and its
coordinator (rank 0) writes ``.metadata`` only after every rank has reported its files written; only
then does rank 0 rename the folder to its name, fsync the parent and ``publish`` (the ``latest``
pointer). A kill at any moment leaves the previous checkpoint and its pointer as they were, plus a
temporary folder that readers ignore and the next publish removes.

Asynchronous saves (``async_save=True``): the states are staged into CPU memory while training waits
(``last_blocked_s``, logged), then written by DCP's background thread on a process group of its own,
so its collectives never interleave with training's. Rank 0 commits when the write completes. The
next save, and ``wait()`` (the Trainer calls it before it closes), wait for the one in flight.

The same folders serve replicated states (DDP with ``async_save``): every rank offers the whole
state, DCP's planner keeps one copy of each tensor and spreads those over the ranks, so each rank
writes about 1/W of it.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..dist import collectives
from . import integrity
from .file import CheckpointError, atomic_link, fsync_dir, read_checkpoint, write_checkpoint

logger = logging.getLogger(__name__)

RUN_FILE = "run.ckpt"
METADATA = integrity.METADATA


@dataclass
class ShardedStates:
    """Objects that DCP saves and loads, every rank its own part (model, optimizer), and how.

    ``saves_folders`` False: a run that saves single files (DDP, synchronous; the states are then
    also among the run's shared states) and can still load these folders.
    """

    states: dict[str, Any]
    async_save: bool = False
    saves_folders: bool = True
    last_blocked_s: float = math.nan  # seconds the last save held training up
    _pending: Any = field(default=None, repr=False)
    _group: Any = field(default=None, repr=False)

    def wait(self) -> None:
        """Block until the save in flight (if any) is written and committed; on every rank."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        future, committed, path = pending
        try:
            future.result()  # raises the write's error
        except BaseException as exc:  # DCP's CheckpointException is a BaseException naming no file
            if not is_dcp_failure(exc):
                raise
            raise integrity.failure(exc, path, "writing") from exc
        if committed is not None:
            committed.wait()
            if committed.error is not None:
                raise committed.error

    def group(self) -> Any:
        """The process group of background writes (created on first use, by every rank at the same save)."""
        if self._group is None and collectives.is_initialized():
            import torch.distributed as dist
            self._group = dist.new_group(backend="gloo")
        return self._group


def is_sharded(path: Path) -> bool:
    """A folder with DCP's index or a run file: a sharded checkpoint (possibly incomplete, which load names)."""
    return path.is_dir() and ((path / METADATA).exists() or (path / RUN_FILE).exists())


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial.tmp")


def save(path: Path, sharded: ShardedStates, payload: dict[str, Any], publish: Callable[[Path], None] | None) -> Path:
    """Write the sharded states with DCP and ``payload`` beside them; commit as the module docstring says."""
    import torch.distributed.checkpoint as dcp
    started = time.perf_counter()  # training is blocked from here: waiting for the previous save counts
    sharded.wait()
    waited = time.perf_counter() - started
    tmp, main = partial_path(path), collectives.rank() == 0

    def prepare() -> None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write_checkpoint(tmp / RUN_FILE, payload)

    collectives.run_collectively(prepare)  # the folder exists on every rank's view before DCP writes
    state = {name: obj.state_dict() for name, obj in sharded.states.items()}
    if sharded.async_save:
        future = dcp.async_save(state, checkpoint_id=tmp, process_group=sharded.group())
        sharded._pending = (future, _commit_when_done(future, tmp, path, publish, started) if main else None, path)
    else:
        try:
            dcp.save(state, checkpoint_id=tmp)
        except BaseException as exc:
            if not is_dcp_failure(exc):
                raise
            raise integrity.failure(exc, path, "writing") from exc
        collectives.run_collectively(lambda: _commit(tmp, path, publish) if main else None)
    sharded.last_blocked_s = time.perf_counter() - started
    logger.info("%s checkpoint %s: training blocked %.3f s (%.3f s of it waiting for the previous save)",
                "asynchronous" if sharded.async_save else "sharded", path, sharded.last_blocked_s, waited)
    return path


class _Committed(threading.Event):
    error: BaseException | None = None


def _commit_when_done(future: Any, tmp: Path, path: Path, publish: Callable[[Path], None] | None,
                      started: float) -> _Committed:
    committed = _Committed()

    def done(f: Any) -> None:
        try:
            if f.exception() is None:
                _commit(tmp, path, publish)
                logger.info("checkpoint %s committed, %.3f s after the save began", path,
                            time.perf_counter() - started)
        except BaseException as exc:  # reported by wait()
            committed.error = exc
            logger.error("committing checkpoint %s failed: %s", path, exc)
        finally:
            committed.set()

    future.add_done_callback(done)
    return committed


def _commit(tmp: Path, path: Path, publish: Callable[[Path], None] | None) -> None:
    """Rank 0: the written folder takes its name, durably; then ``publish``."""
    if not (tmp / METADATA).is_file():
        raise CheckpointError(f"checkpoint {path}: DCP finished without writing {METADATA}")
    integrity.record_index(tmp)
    fsync_dir(tmp)
    _rename_in(tmp, path)  # saving under a name again (best, preempt) moves the old folder aside
    if publish is not None:
        publish(path)


def _rename_in(tmp: Path, path: Path) -> None:
    """The complete folder ``tmp`` takes the name ``path``, durably. A folder already named ``path``
    is moved aside first (a folder cannot be replaced in one rename), so a kill in that instant
    leaves no ``path`` rather than a partial one; it is removed once the new one is in place."""
    old = path.with_name(f".{path.name}.old.tmp")
    if path.exists() or path.is_symlink():
        remove(old)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    remove(old)


def remove(path: Path) -> None:
    """A checkpoint file, folder or link, gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def read_run_file(path: Path, mmap: bool = False) -> tuple[dict[str, Any], Any]:
    """The payload of a sharded checkpoint folder and DCP's index of it, after the cheap checks of
    ``integrity.read_index`` (the index's checksum, every shard there and long enough)."""
    index = integrity.read_index(path)
    return read_checkpoint(path / RUN_FILE, mmap=mmap), index


def load(path: Path, sharded: ShardedStates, index: Any) -> None:
    """Every rank reads its part of the sharded states (resharded by DCP when the world size changed),
    each item checked as it is read; nothing is loaded into a model whose keys or shapes differ."""
    import torch.distributed.checkpoint as dcp
    sharded.wait()
    state = {name: obj.state_dict() for name, obj in sharded.states.items()}
    collectives.run_collectively(lambda: integrity.check_fits(path, index, state), share=(CheckpointError,))
    try:
        dcp.load(state, storage_reader=integrity.checked_reader(path, index))
    except BaseException as exc:
        if not is_dcp_failure(exc):
            raise
        raise integrity.failure(exc, path, "reading") from exc
    for name, obj in sharded.states.items():
        obj.load_state_dict(state[name])


def is_dcp_failure(exc: BaseException) -> bool:
    """DCP's ``CheckpointException``: a BaseException that names no file (``integrity.failure`` does)."""
    from torch.distributed.checkpoint.api import CheckpointException
    return isinstance(exc, CheckpointException)


def link_folder(source: Path, alias: Path) -> None:
    """``alias`` becomes a second checkpoint folder whose files are hard links to ``source``'s (durable
    copies where the file system has none), as a file checkpoint's alias is a hard link: it costs no
    space and outlives ``source`` when ``keep_last`` prunes it (a symbolic link would dangle).

    Built under a temporary name and renamed in; an existing ``alias`` is moved aside first, so a kill
    in that instant leaves no ``alias`` (the next save makes it again) and never a partial one.
    """
    tmp = alias.with_name(f".{alias.name}.link.tmp")
    remove(tmp)
    shutil.copytree(source, tmp, copy_function=lambda src, dst: atomic_link(Path(src), Path(dst)))
    fsync_dir(tmp)
    _rename_in(tmp, alias)
