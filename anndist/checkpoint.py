"""Saving and resuming a run: the collective protocol around checkpoint files.

Saving, loading and resuming are called on **every rank**. Each rank's own state (RNG streams, partial epoch
sums) is gathered to rank 0; rank 0 alone touches the file system; then all ranks pass a barrier (the
gather inside ``run_collectively``, which also turns a failed write on rank 0 into an error on every
rank instead of a hang). A folder of checkpoints holds ``step-<global step>.ckpt`` files, optionally
named ones (``best.ckpt``, ``preempt.ckpt``) and ``latest``, a one-line pointer to the newest complete
checkpoint, rewritten atomically after each checkpoint is complete: the pointer is the commit.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import process_group
from .checkpoint_file import CheckpointError, is_temp, read_checkpoint, write_checkpoint, write_text
from .checkpoint_state import build_payload, check_metadata, rank_state, restore
from .log import get_logger

if TYPE_CHECKING:
    from .trainer import Trainer

LATEST = "latest"
SUFFIX = ".ckpt"
_STEP_NAME = re.compile(r"^step-(\d+)\.ckpt$")

__all__ = ["save_checkpoint", "load_checkpoint", "save_in_dir", "latest_checkpoint", "step_checkpoints",
           "CheckpointError"]


def save_checkpoint(trainer: "Trainer", path: str | os.PathLike, metadata: dict[str, Any],
                    commit: Callable[[Path], None] | None = None) -> Path:
    """Write ``trainer``'s full state to ``path`` (rank 0, atomically); ``commit(path)`` then runs on rank 0."""
    path = Path(path)
    check_metadata(metadata)
    _check_window_closed(trainer)
    ranks = process_group.all_gather_object(rank_state(trainer))
    payload = build_payload(trainer, ranks, metadata)  # on every rank: a state_dict() may be collective

    def write() -> None:
        if trainer.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_checkpoint(path, payload)
            if commit is not None:
                commit(path)

    process_group.run_collectively(write)  # the barrier: no rank returns before rank 0 has written
    return path


def load_checkpoint(trainer: "Trainer", path: str | os.PathLike) -> dict[str, Any]:
    """Restore everything in ``path`` into ``trainer`` on every rank (each its own RNG); return the metadata."""
    path = Path(path)
    metadata = process_group.run_collectively(lambda: restore(trainer, read_checkpoint(path), str(path)))
    get_logger(trainer.rank).info(
        "resumed from %s: epoch %d, optimizer step %d, %d batch(es) into the epoch",
        path, trainer.epoch, trainer.global_step, trainer.batch_in_epoch)
    return metadata


def save_in_dir(trainer: "Trainer", dirpath: str | os.PathLike, name: str | None = None, **metadata: Any) -> Path:
    """Save to ``dirpath/name.ckpt`` (``step-<global step>.ckpt`` when name is None) and point ``latest`` at it."""
    path = checkpoint_path(dirpath, name if name is not None else step_name(trainer.global_step))
    return save_checkpoint(trainer, path, metadata, commit=commit_latest)


def commit_latest(path: Path) -> None:
    """Rank 0, after ``path`` is complete: make it the latest and drop temporary files of dead writers."""
    write_text(path.parent / LATEST, path.name + "\n")
    for stale in path.parent.iterdir():
        if is_temp(stale):
            stale.unlink(missing_ok=True)


def step_name(global_step: int) -> str:
    return f"step-{global_step:09d}"


def checkpoint_path(dirpath: str | os.PathLike, name: str) -> Path:
    if not isinstance(name, str) or not name or "/" in name or os.sep in name or name.startswith("."):
        raise ValueError(f"checkpoint name={name!r} must be a plain file name such as 'preempt' "
                         "(no folders, no leading '.')")
    if name == LATEST:
        raise ValueError(f"checkpoint name={name!r} is reserved for the pointer file; choose another name")
    return Path(dirpath) / (name if name.endswith(SUFFIX) else name + SUFFIX)


def step_checkpoints(dirpath: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(global step, path)`` of the ``step-*.ckpt`` files in ``dirpath``, oldest first."""
    found = []
    for path in Path(dirpath).iterdir():
        match = _STEP_NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(dirpath: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``dirpath`` (None if there is none).

    That is the one ``latest`` names; if the pointer is missing or names a damaged file, the newest
    whole ``*.ckpt`` by recorded progress, each damaged one skipped with a warning.
    """
    dirpath = Path(dirpath)
    if not dirpath.is_dir():
        return None
    logger = get_logger(process_group.rank())
    pointed = _pointer_target(dirpath, logger)
    if pointed is not None:
        problem = _problem(pointed)
        if problem is None:
            return pointed
        logger.warning("skipping checkpoint %s named by %s: %s", pointed, dirpath / LATEST, problem)
    ranked = []
    for path in dirpath.glob(f"*{SUFFIX}"):
        if is_temp(path) or path == pointed:
            continue
        try:
            ranked.append((_progress_key(path), path))
        except (CheckpointError, OSError) as exc:
            logger.warning("skipping checkpoint %s: %s", path, exc)
    return max(ranked)[1] if ranked else None


def _pointer_target(dirpath: Path, logger: Any) -> Path | None:
    pointer = dirpath / LATEST
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning("ignoring unreadable pointer %s: %s", pointer, exc)
        return None
    if not name or "/" in name or name.startswith("."):
        logger.warning("ignoring pointer %s: %r is not a checkpoint file name", pointer, name)
        return None
    return dirpath / name


def _problem(path: Path) -> str | None:
    try:
        read_checkpoint(path, mmap=True)
    except (CheckpointError, OSError) as exc:
        return str(exc)
    return None


def _progress_key(path: Path) -> tuple[int, int, int, float]:
    progress = read_checkpoint(path, mmap=True)["trainer"]["progress"]
    return (progress["global_step"], progress["epoch"], progress["batch_in_epoch"], path.stat().st_mtime)


def _check_window_closed(trainer: "Trainer") -> None:
    # The optimizer zeroes gradients (to None) after each step, so gradients here mean a half-done
    # accumulation window, which a checkpoint cannot hold: resuming would silently drop it.
    if any(p.grad is not None for p in trainer.module.parameters()):
        raise RuntimeError(
            f"save_checkpoint() was called in the middle of an accumulation window (epoch {trainer.epoch}, "
            f"after optimizer step {trainer.global_step}): the gradients accumulated so far cannot be "
            "checkpointed; save from on_batch_end when logs['ends_window'] is true, at on_epoch_end, or after fit()")


def resume(trainer: "Trainer", resume_from: str | os.PathLike | None) -> dict[str, Any] | None:
    """fit()'s ``resume_from``: a file, a folder (its latest), ``"latest"``, or None (``auto_resume``).

    Rank 0 picks the file and tells the others, so every rank loads the same one.
    """
    if resume_from is None and not trainer.pending_auto_resume:
        return None
    if resume_from is not None and not isinstance(resume_from, (str, os.PathLike)):
        raise TypeError(
            f"resume_from must be a path, 'latest' or None, got {type(resume_from).__name__} {resume_from!r}")
    trainer.pending_auto_resume = False
    found = process_group.run_collectively(
        lambda: _locate(trainer, resume_from) if trainer.is_main_process else None)
    path = process_group.broadcast_object(found)
    if path is None:
        get_logger(trainer.rank).info("auto_resume: no checkpoint in %s yet, starting from scratch",
                                      trainer.config.checkpoint_dir)
        return None
    return load_checkpoint(trainer, path)


def _locate(trainer: "Trainer", resume_from: str | os.PathLike | None) -> str | None:
    if resume_from is None:  # auto_resume: a missing checkpoint means a first start
        found = latest_checkpoint(trainer.config.checkpoint_dir)
        return None if found is None else str(found)
    folder = _default_dir(trainer) if resume_from == LATEST else Path(resume_from)
    if not folder.is_dir():
        return str(folder)  # a file: load_checkpoint names it if it is missing or damaged
    found = latest_checkpoint(folder)
    if found is None:
        raise FileNotFoundError(
            f"resume_from={str(resume_from)!r}: no complete checkpoint in {folder}; start without resume_from, "
            "or pass auto_resume=True to the Trainer to resume only when a checkpoint exists")
    return str(found)


def _default_dir(trainer: "Trainer") -> Path:
    if trainer.config.checkpoint_dir is not None:
        return Path(trainer.config.checkpoint_dir)
    from .callbacks.checkpoint import ModelCheckpoint  # late: that module builds on this one

    folders = {Path(cb.dirpath) for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath}
    if len(folders) == 1:
        return folders.pop()
    raise ValueError(
        "resume_from='latest' needs to know the checkpoint folder: pass checkpoint_dir=... to the Trainer "
        f"(found {len(folders)} ModelCheckpoint folder(s)), or pass the folder itself as resume_from")
