"""The zip archives torch.save writes, checked: their directory, and every record's CRC-32.

torch's reader checks neither (a record marked as a folder loads as nothing, a flipped byte inside a
tensor as a wrong weight). ``directory`` checks what the archive's directory says, reading nothing
else (the cheap look a choice among checkpoints takes); ``CheckedFile`` checks each record's CRC-32
as ``torch.load`` reads it (a file checkpoint, read once); ``damaged_archive`` checks an archive in
memory (an item of a DCP shard, mapped), ``damaged_record`` a whole file through a memory map.
"""
from __future__ import annotations

import io
import mmap
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

from .errors import DamagedCheckpointError

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes we skip, name length, extra field length
_SIGNATURE = b"PK\x03\x04"


def damaged(path: Path, problem: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"checkpoint {path} cannot be read, it is damaged: {problem}; use an earlier checkpoint")


def directory(path: Path) -> list[zipfile.ZipInfo]:
    """The zip records of the checkpoint file ``path``, after checking that their directory is whole and sane."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(
            f"checkpoint {path} is a folder; pass a checkpoint file, or resume_from={str(path)!r} to fit() "
            "to resume from the latest checkpoint in it")
    with open(path, "rb") as file:
        try:
            whole = zipfile.is_zipfile(file)  # reads the archive's trailer: a cut-short file has none
        except zipfile.BadZipFile as exc:  # a trailer that is there but contradicts itself
            raise damaged(path, f"its zip trailer is invalid ({exc})") from exc
        if not whole:
            raise DamagedCheckpointError(
                f"checkpoint {path} ({path.stat().st_size} bytes) is truncated or not a torch.save file: it has no "
                "complete zip directory; it was cut short (a crash while copying it?) or is another kind of file")
        try:
            records = zipfile.ZipFile(file).infolist()
        except OSError:
            raise
        except Exception as exc:  # BadZipFile, NotImplementedError, struct.error...: the directory is garbage
            raise damaged(path, f"its zip directory cannot be read ({type(exc).__name__}: {exc})") from exc
        size = os.fstat(file.fileno()).st_size
    for record in records:
        problem = _entry_problem(record, size)
        if problem is not None:
            raise damaged(path, problem)
    return records


class CheckedFile(io.RawIOBase):
    """A checkpoint file as ``torch.load`` reads it, each record's CRC-32 checked on the bytes as they go by.

    torch's reader reads a record's local header, then its data in one read straight into the tensor's
    memory: the header says where the data starts, the CRC-32 is computed over that buffer, and a
    mismatch raises before torch goes on. Records torch did not read in one piece (or not at all) are
    checked by ``check_the_rest``, by reading them: no record goes unchecked, whatever torch's reads.
    """

    def __init__(self, raw: Any, records: list[zipfile.ZipInfo]) -> None:
        super().__init__()
        self.raw, self.problem = raw, None
        self.size = os.fstat(raw.fileno()).st_size
        self.headers = {record.header_offset: record for record in records}
        self.starts: dict[int, zipfile.ZipInfo] = {}  # where each record's data begins, as torch finds out
        self.unchecked = {record.header_offset: record for record in records if record.CRC != 0}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def readinto(self, buffer: Any) -> int:
        position = self.raw.tell()
        with memoryview(buffer).cast("B") as view:
            done = 0
            while done < len(view):  # a regular file gives everything up to its end; be sure of it
                got = self.raw.readinto(view[done:])
                if not got:
                    break
                done += got
            self._saw(position, view[:done])
        return done

    def _saw(self, position: int, data: memoryview) -> None:
        record = self.headers.get(position)
        if record is not None and len(data) >= _LOCAL_HEADER.size:
            signature, name_len, extra_len = _LOCAL_HEADER.unpack(data[:_LOCAL_HEADER.size])
            if signature != _SIGNATURE:
                self._fail(f"{_where(record)} has no zip header where the directory says")
            start = position + _LOCAL_HEADER.size + name_len + extra_len
            if start + record.compress_size > self.size:
                self._fail(f"{_where(record)} has a directory entry torch.save never writes (compressed, a folder, "
                           "or past the end)")
            self.starts[start] = record
            return
        record = self.starts.get(position)
        if record is not None and len(data) == record.compress_size and record.header_offset in self.unchecked:
            problem = _crc_problem(record, data)
            if problem is not None:
                self._fail(problem)
            del self.unchecked[record.header_offset]

    def _fail(self, problem: str) -> None:
        self.problem = problem
        raise DamagedCheckpointError(problem)

    def check_the_rest(self) -> str | None:
        """Check the records torch did not read whole (read here, once each): the first problem, or None."""
        for record in list(self.unchecked.values()):
            self.raw.seek(record.header_offset)
            header = self.raw.read(_LOCAL_HEADER.size)
            signature, name_len, extra_len = (_LOCAL_HEADER.unpack(header) if len(header) == _LOCAL_HEADER.size
                                              else (b"", 0, 0))
            if signature != _SIGNATURE:
                return f"{_where(record)} has no zip header where the directory says"
            self.raw.seek(record.header_offset + _LOCAL_HEADER.size + name_len + extra_len)
            problem = _crc_problem(record, memoryview(self.raw.read(record.compress_size)))
            if problem is not None:
                return problem
            del self.unchecked[record.header_offset]
        return None


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


def _where(record: zipfile.ZipInfo) -> str:
    return f"record {record.filename!r} ({record.compress_size} bytes at offset {record.header_offset})"


def _entry_problem(record: zipfile.ZipInfo, size: int) -> str | None:
    """What is wrong with ``record``'s directory entry in an archive of ``size`` bytes (None: nothing)."""
    # torch's reader reads a record marked as a folder (DOS attribute 0x10) as nothing, silently.
    if (record.compress_type != zipfile.ZIP_STORED or record.file_size != record.compress_size
            or record.is_dir() or record.external_attr & 0x10
            or record.header_offset + _LOCAL_HEADER.size + record.compress_size > size):
        return f"{_where(record)} has a directory entry torch.save never writes (compressed, a folder, or past the end)"
    return None


def _crc_problem(record: zipfile.ZipInfo, stored: memoryview) -> str | None:
    if len(stored) != record.compress_size:
        return f"{_where(record)} is cut short ({len(stored)} of its {record.compress_size} bytes)"
    crc = zlib.crc32(stored)
    if crc != record.CRC:
        return f"{_where(record)} fails its CRC-32 check (recorded {record.CRC:08x}, read {crc:08x})"
    return None


def _check_record(mapped: Any, data: memoryview, record: zipfile.ZipInfo) -> str | None:
    header = mapped[record.header_offset:record.header_offset + _LOCAL_HEADER.size]
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(header) if len(header) == _LOCAL_HEADER.size else (b"", 0, 0)
    if signature != _SIGNATURE:
        return f"{_where(record)} has no zip header where the directory says"
    start = record.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if _entry_problem(record, len(data)) is not None or start + record.compress_size > len(data):
        return f"{_where(record)} has a directory entry torch.save never writes (compressed, a folder, or past the end)"
    if record.CRC == 0:
        return None
    with data[start:start + record.compress_size] as stored:
        return _crc_problem(record, stored)
