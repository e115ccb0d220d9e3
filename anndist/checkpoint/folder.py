"""A folder of checkpoints: ``step-<global step>.ckpt`` files, named ones (``best.ckpt``,
``preempt.ckpt``) and ``latest``, a one-line pointer to the newest complete checkpoint.

The pointer is the commit: rank 0 rewrites it atomically only after the checkpoint it names is
complete, and readers trust it first. If it is missing or names a checkpoint that is not whole, the
newest whole ``*.ckpt`` by recorded progress is used instead, each one skipped with a warning.

Choosing reads no checkpoint's data: "whole" is what sizes and the zip directory say (``check_whole``),
and the progress of each candidate comes from its pickle alone. Damage inside the data is found by
the load, which checks every byte as it reads it once; a resume then falls back to the previous one
(``skip``).
"""
from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

from .file import CheckpointError, atomic_link, check_whole, fsync_dir, is_temp, peek_checkpoint, write_text
from .payload import progress_key, upgrade
from .protocol import RunState, save
from .sharded import check_whole as check_folder_whole, is_sharded, link_folder, peek_run_file, remove

logger = logging.getLogger(__name__)

LATEST = "latest"
SUFFIX = ".ckpt"
_STEP_NAME = re.compile(r"^step-(\d+)\.ckpt$")


class CheckpointFolder:
    """Saves into one folder and keeps its ``latest`` pointer, aliases and ``keep_last`` pruning."""

    def __init__(self, dirpath: str | os.PathLike) -> None:
        self.dirpath = Path(dirpath)

    def save(self, run: RunState, name: str, metadata: dict[str, Any] | None = None,
             aliases: Sequence[str] = (), keep_last: int | None = None) -> Path:
        """Save ``run`` as ``name`` on every rank; once complete, rank 0 links ``aliases`` to it, points
        ``latest`` at it and keeps the newest ``keep_last`` step checkpoints."""
        path = self.path(name)
        publish = functools.partial(self._publish, aliases=[self.path(a) for a in aliases], keep_last=keep_last)
        return save(path, run, metadata or {}, publish=publish)

    def path(self, name: str) -> Path:
        return checkpoint_path(self.dirpath, name)

    def _publish(self, written: Path, aliases: list[Path], keep_last: int | None) -> None:
        for alias in aliases:  # a second name, no second write
            link_folder(written, alias) if written.is_dir() else atomic_link(written, alias)
        write_text(self.dirpath / LATEST, written.name + "\n")
        for stale in self.dirpath.iterdir():  # temporary files of writers that died
            if is_temp(stale):
                remove(stale)
        if keep_last is not None:
            for _, old in step_checkpoints(self.dirpath)[:-keep_last]:
                if old != written:
                    remove(old)
            fsync_dir(self.dirpath)


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


ROLLED_BACK = "rolled_back"  # the step checkpoints a rollback abandoned: kept, out of resume's sight


def step_checkpoint_before(dirpath: str | os.PathLike, step: int) -> Path | None:
    """The newest complete ``step-*.ckpt`` in ``dirpath`` of a global step below ``step`` (None if there is
    none); damaged ones are skipped with a warning naming them."""
    if not Path(dirpath).is_dir():
        return None
    for saved, path in reversed(step_checkpoints(dirpath)):
        if saved >= step:
            continue
        problem = _problem(path)
        if problem is None:
            return path
        logger.warning("skipping checkpoint %s: %s", path, problem)
    return None


def roll_back_to(target: Path) -> list[Path]:
    """Make ``target`` the folder's latest again: the step checkpoints after it (a trajectory a rollback
    abandoned) move into ``rolled_back/``, where neither ``latest``, a resume nor pruning sees them, and
    ``latest`` names ``target``. Rank 0 only. Returns the moved checkpoints' new paths."""
    dirpath, (step,) = target.parent, [s for s, p in step_checkpoints(target.parent) if p == target]
    aside = dirpath / ROLLED_BACK
    moved = []
    for saved, path in step_checkpoints(dirpath):
        if saved > step:
            aside.mkdir(exist_ok=True)
            remove(aside / path.name)
            os.replace(path, aside / path.name)
            moved.append(aside / path.name)
    write_text(dirpath / LATEST, target.name + "\n")
    fsync_dir(dirpath)
    return moved


def latest_checkpoint(dirpath: str | os.PathLike, skip: Sequence[str | os.PathLike] = ()) -> Path | None:
    """The newest whole checkpoint in ``dirpath`` (None if there is none); see the module docstring.

    ``skip``: checkpoints found damaged while loading them (a record or a shard's item fails its
    CRC-32), which the cheap checks made here cannot see.
    """
    dirpath, skipped = Path(dirpath), {Path(p) for p in skip}
    if not dirpath.is_dir():
        return None
    pointed = _pointer_target(dirpath)
    if pointed is not None and pointed not in skipped:
        problem = _problem(pointed)
        if problem is None:
            return pointed
        logger.warning("skipping checkpoint %s named by %s: %s", pointed, dirpath / LATEST, problem)
    ranked = []
    for path in dirpath.glob(f"*{SUFFIX}"):
        if is_temp(path) or path == pointed or path in skipped:
            continue
        try:
            ranked.append((progress_key(upgrade(_read(path))), path.stat().st_mtime, path))
        except (CheckpointError, OSError) as exc:
            logger.warning("skipping checkpoint %s: %s", path, exc)
    return max(ranked)[2] if ranked else None


def resolve(resume_from: str | os.PathLike, default_dir: Path | None, skip: Sequence[str | os.PathLike] = ()) -> Path:
    """The file ``fit(resume_from=...)`` means: a file, a folder's latest, or ``"latest"`` of ``default_dir``."""
    if resume_from == LATEST:
        if default_dir is None:
            raise ValueError(
                "resume_from='latest' needs to know the checkpoint folder: pass checkpoint_dir=... to the Trainer "
                "(or give exactly one ModelCheckpoint a dirpath), or pass the folder itself as resume_from")
        folder = default_dir
    else:
        folder = Path(resume_from)
    if not chooses(folder):
        return folder  # a file or a sharded checkpoint folder: loading it names what is missing or damaged
    found = latest_checkpoint(folder, skip)
    if found is None:
        raise FileNotFoundError(
            f"resume_from={str(resume_from)!r}: no complete checkpoint in {folder}; start without resume_from, "
            "or pass auto_resume=True to the Trainer to resume only when a checkpoint exists")
    return found


def chooses(folder: Path) -> bool:
    """Whether ``resume_from=folder`` picks one of the checkpoints in it (rather than being one)."""
    return folder.is_dir() and not is_sharded(folder)


def _pointer_target(dirpath: Path) -> Path | None:
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


def _read(path: Path) -> dict[str, Any]:
    """A checkpoint file's payload, or a sharded checkpoint folder's run file, its data not read."""
    return peek_run_file(path) if path.is_dir() else peek_checkpoint(path)


def _problem(path: Path) -> str | None:
    return check_folder_whole(path) if path.is_dir() else check_whole(path)
