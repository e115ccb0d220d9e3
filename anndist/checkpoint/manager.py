"""The Trainer's side of checkpoints: what a run saves (its ``RunState``), where, and how it resumes.

In the manner of torchtitan's ``CheckpointManager``: the Trainer hands over its state objects once;
this class saves and loads them through the rest of ``checkpoint/`` and never touches the Trainer.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

from ..dist import collectives
from ..step.train_state import TrainState
from . import protocol
from .file import DamagedCheckpointError
from .folder import (LATEST, CheckpointFolder, chooses, latest_checkpoint, resolve as resolve_checkpoint, roll_back_to,
                     step_checkpoint_before, step_name)
from .protocol import RunState

logger = logging.getLogger(__name__)

WEIGHTS = ("model", "optimizer", "scheduler", "scaler", "callbacks")  # what a rollback restores


class CheckpointManager:
    def __init__(self, run: RunState, train_state: TrainState, checkpoint_dir: Path | None,
                 default_dir: Callable[[], Path | None], auto_resume: bool) -> None:
        self.run, self.train_state = run, train_state
        self.checkpoint_dir, self.default_dir = checkpoint_dir, default_dir
        self.pending_auto_resume = auto_resume  # the first fit() looks for a checkpoint

    def check_folder(self) -> None:
        """Find a checkpoint_dir that cannot hold checkpoints now, not at the first save (often the preemption).

        Rank 0 creates the folder and writes and removes a probe file; every rank learns the verdict.
        """
        if self.checkpoint_dir is None:
            return
        problem = _unwritable(self.checkpoint_dir) if collectives.rank() == 0 else None
        problem = collectives.broadcast_object(problem)
        if problem is not None:
            raise ValueError(f"checkpoint_dir={str(self.checkpoint_dir)!r} cannot hold checkpoints: {problem}; pass a "
                             "folder this job can create and write (on a file system every node sees)")

    def save(self, path: str | os.PathLike, metadata: dict[str, Any]) -> Path:
        return protocol.save(path, self.run, metadata)

    def save_in_dir(self, dirpath: str | os.PathLike, name: str | None, metadata: dict[str, Any]) -> Path:
        name = name if name is not None else step_name(self.train_state.global_step)
        return CheckpointFolder(dirpath).save(self.run, name, metadata)

    def wait(self) -> None:
        """Block until an asynchronous save in flight is written and committed (every rank)."""
        if self.run.sharded is not None:
            self.run.sharded.wait()

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        metadata = protocol.load(path, self.run)
        state = self.train_state
        logger.info("resumed from %s: epoch %d, optimizer step %d, %d batch(es) into the epoch",
                    path, state.epoch, state.global_step, state.batch_in_epoch)
        return metadata

    def resume(self, resume_from: str | os.PathLike | None) -> None:
        """fit()'s ``resume_from`` or ``auto_resume``: rank 0 picks the file, every rank loads that one."""
        if resume_from is None and not self.pending_auto_resume:
            return
        if resume_from is not None and not isinstance(resume_from, (str, os.PathLike)):
            raise TypeError(
                f"resume_from must be a path, 'latest' or None, got {type(resume_from).__name__} {resume_from!r}")
        self.pending_auto_resume = False
        main, damaged = collectives.rank() == 0, []
        while True:
            found = collectives.run_collectively(lambda: self._locate(resume_from, damaged) if main else None)
            path, chosen = collectives.broadcast_object(found)
            if path is None:
                if damaged:  # the model may hold part of a damaged checkpoint: never train on from it
                    raise DamagedCheckpointError(f"no good checkpoint left after {damaged} (damaged, see above)")
                logger.info("auto_resume: no checkpoint in %s yet, starting from scratch", self.checkpoint_dir)
                return
            try:
                self.load(path)
                return
            except DamagedCheckpointError as exc:  # raised alike on every rank (protocol.SHARED_ERRORS)
                if not chosen:  # the checkpoint the user named
                    raise
                logger.warning("skipping checkpoint %s, damaged: %s; trying the previous one", path, exc)
                damaged.append(path)

    def roll_back(self, before_step: int) -> dict[str, Any] | None:
        """Model, optimizer, scheduler, scaler, the callbacks' state and ``global_step`` from the newest step
        checkpoint of the run's folder older than ``before_step``; the rest (the position in the data,
        RNG streams, sums, history) stays as it is. The checkpoints after it move aside and ``latest``
        names it, so a crash now resumes the rolled-back run. On every rank; None when there is no such
        checkpoint. The loss-spike guard's rollback (step/spike_guard.py)."""
        self.wait()  # an asynchronous save in flight is committed first: every rank sees the same folder
        folder, main = self.default_dir(), collectives.rank() == 0

        def locate() -> str | None:
            found = step_checkpoint_before(folder, before_step) if main and folder is not None else None
            if found is not None:
                for path in roll_back_to(found):
                    logger.info("checkpoint %s abandoned by the rollback to %s: moved to %s", path.name, found.name, path)
            return None if found is None else str(found)

        path = collectives.broadcast_object(collectives.run_collectively(locate))
        if path is None:
            return None
        position: dict[str, Any] = {}
        weights = {name: obj for name, obj in self.run.states.items() if name in WEIGHTS}
        protocol.load(path, RunState({**weights, "train_state": _Position(position)}, sharded=self.run.sharded))
        self.train_state.global_step = position["global_step"]
        return {"checkpoint": Path(path).name, **position}

    def _locate(self, resume_from: str | os.PathLike | None, damaged: list[str]) -> tuple[str | None, bool]:
        """The checkpoint to load, and whether it was chosen among a folder's (so that another may replace it)."""
        if resume_from is None:  # auto_resume: a missing checkpoint means a first start
            found = latest_checkpoint(self.checkpoint_dir, damaged)
            return (None if found is None else str(found)), True
        chosen = resume_from == "latest" or chooses(Path(resume_from))
        return str(resolve_checkpoint(resume_from, self.default_dir(), damaged)), chosen


class _Position:
    """Reads a checkpoint's step and position in the data into ``into``, changing nothing (a rollback)."""

    def __init__(self, into: dict[str, Any]) -> None:
        self.into = into

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.into.update({key: int(state[key]) for key in ("global_step", "epoch", "batch_in_epoch")})


def check_window_closed(module: Any, state: TrainState) -> None:
    """Refuse a save in the middle of an accumulation window.

    The optimizer zeroes gradients (to None) after each step, so gradients here mean a half-done
    window, which a checkpoint cannot hold: resuming would silently drop it.
    """
    if any(p.grad is not None for p in module.parameters()):
        raise RuntimeError(
            f"save_checkpoint() was called in the middle of an accumulation window (epoch {state.epoch}, "
            f"after optimizer step {state.global_step}): the gradients accumulated so far cannot be "
            "checkpointed; save from on_batch_end when logs['ends_window'] is true, at on_epoch_end, or after fit()")


def _unwritable(folder: Path) -> str | None:
    """Why ``folder`` cannot take a new checkpoint and its ``latest`` pointer (None when it can)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".anndist-probe-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
    pointer = folder / LATEST
    if pointer.exists() and not pointer.is_file():
        kind = "a folder" if pointer.is_dir() else "not a regular file"
        return (f"its pointer {pointer} is {kind}; every save rewrites it as a one-line file naming the newest "
                "checkpoint, so move it away")
    return None
