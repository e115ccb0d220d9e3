"""Checkpoint files on disk: atomic, durable writes and reads that say what is wrong.

A write goes to a temporary file in the destination folder (so the rename cannot cross file
systems), is flushed and fsynced, renamed over the destination with ``os.replace`` and the folder is
fsynced so the rename itself survives a power cut. A kill at any moment therefore leaves either the
old file or the new one under the final name, never a torn one; what a kill can leave behind is a
temporary file, whose name starts with ``.`` and ends with ``.tmp`` and which readers ignore.

Reads check the CRC-32 that torch.save stores with every zip record (torch's reader does not, so a
flipped byte inside a tensor would load as a wrong weight) as ``torch.load(weights_only=True)`` reads
the record, on the bytes it just read into the tensor: each byte is read from the file once, and a
damaged record stops the load before anything is returned. A checkpoint can hold tensors, numbers,
strings, lists and dicts, never arbitrary pickled objects. ``check_whole`` and ``peek_checkpoint``
are the cheap looks that choosing among checkpoints uses: the zip directory (sizes, where each record
lies), no data. Nothing here knows about ranks: callers decide who writes and who reads.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .errors import CheckpointError, DamagedCheckpointError
from .zip_checks import CheckedFile, damaged, damaged_record, directory
from .zip_checks import BufferReader, damaged_archive  # noqa: F401 (their callers import them from here too)

FORMAT = "anndist.checkpoint"
FORMAT_VERSION = 2  # 1: anndist 0.1 (read and upgraded by payload.upgrade)
TEMP_SUFFIX = ".tmp"


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
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        full = disk_full_error(exc, path)
        if full is not None:  # torch reports it as "unexpected pos N vs M", the cause buried in the chain
            raise full from exc
        raise
    fsync_dir(path.parent)
    return path


_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def disk_full_error(exc: BaseException, path: Path, where: str = "") -> OSError | None:
    """An ``OSError(ENOSPC/EDQUOT)`` naming ``path`` and the free space, when ``exc`` was caused by a full
    disk or quota (None otherwise)."""
    full = _disk_full(exc)
    if full is None:
        return None
    return OSError(full.errno, f"{_FULL[full.errno]} writing {path}{where} ({_free(path.parent)}): free space there "
                   "or write elsewhere; nothing under that name was changed")


def _disk_full(exc: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT error in ``exc``'s chain of causes, if there is one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _free(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 1e6:.0f} MB free there now"
    except OSError:
        return "free space unknown"


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
    with _crc32_on():
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


@contextlib.contextmanager
def _crc32_on() -> Any:
    """Make torch.save record each record's CRC-32 (which reads check) even if the user turned it off."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None:  # torch versions without the option always compute it
        yield
        return
    before = get()
    torch.serialization.set_crc32_options(True)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda file: file.write(text.encode()))


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Load an anndist checkpoint; raise an error naming ``path`` if it is missing, torn, damaged or foreign.

    Every record's CRC-32 is checked as the load reads it (``CheckedFile``). ``mmap=True`` maps the
    tensor data instead of copying it, after a CRC pass over the mapped file.
    """
    path = Path(path)
    records = directory(path)
    if mmap:
        problem = damaged_record(path)
        if problem is not None:
            raise damaged(path, problem)
        payload = _torch_load(path, path, mmap=True)
    else:
        payload = _load_checked(path, records)
    check_format(payload, path)
    return payload


def peek_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The payload of ``path``, its tensors mapped and not read, after ``check_whole``'s checks only: what
    choosing among checkpoints needs (their progress), for the price of the zip directory and the pickle."""
    path = Path(path)
    directory(path)
    payload = _torch_load(path, path, mmap=True)
    check_format(payload, path)
    return payload


def check_whole(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a whole checkpoint file, from its zip directory alone (None when it looks whole):
    missing, cut short, or a directory that places records where torch.save never does. No data is read;
    damage inside a record is found by the load."""
    try:
        directory(Path(path))
    except (CheckpointError, OSError) as exc:
        return str(exc)
    return None


def _torch_load(source: Any, path: Path, mmap: bool = False) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise CheckpointError(_load_failure(path, exc)) from exc


def _load_checked(path: Path, records: list[zipfile.ZipInfo]) -> Any:
    """``torch.load`` of ``path`` through a ``CheckedFile``: each record checked as it is read, once."""
    with open(path, "rb", buffering=0) as raw:
        checked = CheckedFile(raw, records)
        try:
            payload = torch.load(checked, map_location="cpu", weights_only=True)
        except Exception as exc:
            if checked.problem is not None:  # the CRC check stopped the load
                raise damaged(path, checked.problem) from exc
            raise CheckpointError(_load_failure(path, exc)) from exc
        problem = checked.check_the_rest()
    if problem is not None:
        raise damaged(path, problem)
    return payload


def _load_failure(path: Path, exc: Exception) -> str:
    message = str(exc)
    if "Weights only load failed" in message:  # torch's weights-only unpickler refused something
        return (f"checkpoint {path} was refused: torch.load(weights_only=True) does not load {_refused(message)} "
                "that it holds; anndist checkpoints hold only tensors, numbers, strings, lists and dicts, so this "
                "file was not written by anndist or was changed since")
    detail = " ".join(_without_advice(message).split())[:300] or type(exc).__name__
    return f"checkpoint {path} cannot be read, it is damaged ({detail}); use an earlier checkpoint"


_REFUSALS = (
    (re.compile(r"GLOBAL (\S+) whose module (\S+) is blocked"), "the global {0} (its module {1} is blocked)"),
    (re.compile(r"GLOBAL (\S+) was not an allowed global"), "the global {0} (not an allowed global)"),
)


def _refused(message: str) -> str:
    """What torch's weights-only unpickler refused, without its advice to load the file unsafely."""
    for pattern, words in _REFUSALS:
        match = pattern.search(message)
        if match:
            return words.format(*match.groups())
    reason = " ".join(_without_advice(message).split())[:200]
    return f"an object it does not rebuild ({reason})" if reason else "an object it does not rebuild"


def _without_advice(message: str) -> str:
    # torch's messages suggest weights_only=False, which would run whatever the file's pickle says.
    advice = ("weights_only", "Weights only", "documentation", "Re-running", "trust")
    return "\n".join(line for line in message.splitlines() if not any(word in line for word in advice))


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
