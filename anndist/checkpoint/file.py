"""Checkpoint files on disk: atomic, durable writes and reads that say what is wrong.

A write goes to a temporary file in the destination folder (so the rename cannot cross file
systems), is flushed and fsynced, renamed over the destination with ``os.replace`` and the folder is
fsynced so the rename itself survives a power cut. A kill at any moment therefore leaves either the
old file or the new one under the final name, never a torn one; what a kill can leave behind is a
temporary file, whose name starts with ``.`` and ends with ``.tmp`` and which readers ignore.

Reads use ``torch.load(weights_only=True)``: a checkpoint can hold tensors, numbers, strings, lists
and dicts, never arbitrary pickled objects. Nothing here knows about ranks: callers decide who writes.
"""
from __future__ import annotations

import errno
import os
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

FORMAT = "anndist.checkpoint"
FORMAT_VERSION = 2  # 1: anndist 0.1 (read and upgraded by payload.upgrade)
TEMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used; the message names the file and what is wrong with it."""


def temp_path(path: Path) -> Path:
    """A fresh temporary name next to ``path``, hidden and unique per writer."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Create ``path`` atomically: ``write(file)`` fills a temporary file that then replaces ``path``."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as file:  # "x": never follow or reuse a file someone else created
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_link(source: Path, path: Path) -> Path:
    """Make ``path`` a second name of the complete file ``source`` (hard link; a copy where links fail)."""
    tmp = temp_path(path)
    try:
        try:
            os.link(source, tmp)
        except OSError:  # file systems without hard links: copy, durably
            with open(source, "rb") as src:
                return atomic_write(path, lambda dst: shutil.copyfileobj(src, dst, 1 << 24))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(folder: Path) -> None:
    """Make renames and unlinks in ``folder`` durable (a no-op where the file system cannot)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some network file systems refuse fsync on folders
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Serialise ``payload`` (a dict built by ``payload.build``) to ``path`` atomically."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint path {path} is a folder; pass a file name such as {path / 'last.ckpt'}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write checkpoint {path}: folder {path.parent} does not exist")
    return atomic_write(path, lambda file: _save_checked(payload, file, path))


def _save_checked(payload: Mapping[str, Any], file: Any, path: Path) -> None:
    torch.save(dict(payload), file)
    # Refuse to publish a file that torch.load(weights_only=True) would reject later, on resume.
    # The check reads only the pickle (not the tensor data) back from the page cache.
    file.flush()
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(file.name)
    if unsafe:
        raise TypeError(
            f"checkpoint {path} would hold objects that torch.load(weights_only=True) refuses: {unsafe}; "
            "metadata and callback/scheduler state_dict() must hold only tensors, numbers, strings, "
            "lists and dicts")


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda file: file.write(text.encode()))


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Load an anndist checkpoint; raise an error naming ``path`` if it is missing, torn or foreign.

    ``mmap=True`` maps the tensor data instead of reading it: a cheap check that the file is whole.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(
            f"checkpoint {path} is a folder; pass a checkpoint file, or resume_from={str(path)!r} to fit() "
            "to resume from the latest checkpoint in it")
    if not zipfile.is_zipfile(path):  # reads the archive's trailer: a cut-short file has none
        raise CheckpointError(
            f"checkpoint {path} ({path.stat().st_size} bytes) is truncated or not a torch.save file: it has no "
            "complete zip directory; it was cut short (a crash while copying it?) or is another kind of file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise CheckpointError(_load_failure(path, exc)) from exc
    check_format(payload, path)
    return payload


def _load_failure(path: Path, exc: Exception) -> str:
    unsafe = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line]
    if unsafe:
        return (f"checkpoint {path} holds objects that torch.load(weights_only=True) refuses ({unsafe[0]}); "
                "it was not written by anndist")
    detail = " ".join(str(exc).split())[:300] or type(exc).__name__
    return f"checkpoint {path} cannot be read, it is damaged ({detail}); use an earlier checkpoint"


def check_format(payload: Any, path: Path) -> None:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        held = sorted(map(str, payload))[:8] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"checkpoint {path} is not an anndist checkpoint (it holds {held}); to load bare weights "
            "use model.load_state_dict(torch.load(path, weights_only=True))")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}, newer than this anndist reads "
            f"({FORMAT_VERSION}); upgrade anndist")
