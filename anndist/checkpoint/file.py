"""Checkpoint files on disk: atomic, durable writes and reads that say what is wrong.

A write goes to a temporary file in the destination folder (so the rename cannot cross file
systems), is flushed and fsynced, renamed over the destination with ``os.replace`` and the folder is
fsynced so the rename itself survives a power cut. A kill at any moment therefore leaves either the
old file or the new one under the final name, never a torn one; what a kill can leave behind is a
temporary file, whose name starts with ``.`` and ends with ``.tmp`` and which readers ignore.

Reads first check the CRC-32 that torch.save stores with every zip record (torch's reader does not,
so a flipped byte inside a tensor would load as a wrong weight), then use
``torch.load(weights_only=True)``: a checkpoint can hold tensors, numbers, strings, lists and dicts,
never arbitrary pickled objects. Nothing here knows about ranks: callers decide who writes.
"""
from __future__ import annotations

import contextlib
import errno
import io
import mmap
import os
import re
import shutil
import struct
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

FORMAT = "anndist.checkpoint"
FORMAT_VERSION = 2  # 1: anndist 0.1 (read and upgraded by payload.upgrade)
TEMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used; the message names the file and what is wrong with it."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose bytes are not those written (cut short, missing, changed): a resume that
    chose it from a folder falls back to the previous good one."""


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

    Every record's CRC-32 is checked first, with or without ``mmap``. ``mmap=True`` then maps the tensor
    data instead of copying it: the check that a file is whole and intact, without the cost of a load.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(
            f"checkpoint {path} is a folder; pass a checkpoint file, or resume_from={str(path)!r} to fit() "
            "to resume from the latest checkpoint in it")
    try:
        whole = zipfile.is_zipfile(path)  # reads the archive's trailer: a cut-short file has none
    except zipfile.BadZipFile as exc:  # a trailer that is there but contradicts itself
        raise DamagedCheckpointError(f"checkpoint {path} cannot be read, it is damaged: its zip trailer is invalid "
                              f"({exc}); use an earlier checkpoint") from exc
    if not whole:
        raise DamagedCheckpointError(
            f"checkpoint {path} ({path.stat().st_size} bytes) is truncated or not a torch.save file: it has no "
            "complete zip directory; it was cut short (a crash while copying it?) or is another kind of file")
    problem = damaged_record(path)
    if problem is not None:
        raise DamagedCheckpointError(
            f"checkpoint {path} cannot be read, it is damaged: {problem}; use an earlier checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise CheckpointError(_load_failure(path, exc)) from exc
    check_format(payload, path)
    return payload


def damaged_record(path: Path) -> str | None:
    """What is damaged inside the zip archive ``path`` (a record whose CRC-32 does not match), or None.

    The data is read through a memory map, so checking costs one pass of zlib.crc32 over the file
    and no copy. A record stored with CRC 0 is not checked: torch writes 0 for every record after
    ``torch.serialization.set_crc32_options(False)`` (anndist's own writes turn it back on).
    """
    with open(path, "rb") as file:
        try:
            records = zipfile.ZipFile(file).infolist()
        except OSError:
            raise
        except Exception as exc:  # BadZipFile, NotImplementedError, struct.error...: the directory is garbage
            return f"its zip directory cannot be read ({type(exc).__name__}: {exc})"
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as data:
            return _first_damaged(records, mapped, data)


def damaged_archive(data: Any) -> str | None:
    """``damaged_record`` for a ``torch.save`` archive in a buffer (an item of a DCP shard, mapped)."""
    with memoryview(data) as view:
        try:
            records = zipfile.ZipFile(BufferReader(view)).infolist()  # reads the directory only
        except Exception as exc:  # BadZipFile, NotImplementedError, struct.error...: not an archive, or garbled
            return f"it is not a whole torch.save archive ({type(exc).__name__}: {exc})"
        return _first_damaged(records, view, view)


class BufferReader(io.RawIOBase):
    """A read-only, seekable file over a buffer that copies nothing until read: ``readinto`` copies
    straight into the reader's memory (torch.load's storages, zipfile's few directory bytes)."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self.view, self.position = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), len(self.view) - self.position))
        buffer[:n] = self.view[self.position:self.position + n]
        self.position += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: len(self.view)}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position


def _first_damaged(records: list[zipfile.ZipInfo], mapped: Any, data: memoryview) -> str | None:
    for record in records:
        problem = _check_record(mapped, data, record)
        if problem is not None:
            return problem
    return None


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes we skip, name length, extra field length


def _check_record(mapped: Any, data: memoryview, record: zipfile.ZipInfo) -> str | None:
    where = f"record {record.filename!r} ({record.compress_size} bytes at offset {record.header_offset})"
    header = mapped[record.header_offset:record.header_offset + _LOCAL_HEADER.size]
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(header) if len(header) == _LOCAL_HEADER.size else (b"", 0, 0)
    if signature != b"PK\x03\x04":
        return f"{where} has no zip header where the directory says"
    start = record.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    # torch's reader reads a record marked as a folder (DOS attribute 0x10) as nothing, silently.
    if (record.compress_type != zipfile.ZIP_STORED or record.file_size != record.compress_size
            or record.is_dir() or record.external_attr & 0x10 or start + record.compress_size > len(data)):
        return f"{where} has a directory entry torch.save never writes (compressed, a folder, or past the end)"
    if record.CRC == 0:
        return None
    with data[start:start + record.compress_size] as stored:
        crc = zlib.crc32(stored)
    if crc != record.CRC:
        return f"{where} fails its CRC-32 check (recorded {record.CRC:08x}, read {crc:08x})"
    return None


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
