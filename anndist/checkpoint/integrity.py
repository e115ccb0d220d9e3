"""Checks of a sharded (DCP) checkpoint folder that read no shard twice.

DCP checks nothing it reads: ``.metadata`` is a pickle, and every item of a ``.distcp`` shard is a
``torch.save`` archive whose per-record CRC-32 torch's reader ignores, so a flipped byte loads as a
wrong weight. And DCP loads only the keys it is asked for, so a folder of a bigger model loads into
a smaller one without a word. Here:

* **at the commit** rank 0 writes ``.metadata.crc32`` beside the index: its CRC-32 and size;
* **when ``latest`` picks a folder**, ``.metadata`` is there and as long as recorded (``looks_whole``:
  a ``stat``, nothing read);
* **before a load**, one reader (rank 0) checks ``.metadata`` against its checksum and that each shard
  the index names exists and is as long as the index says (a ``stat`` per file, no data read), and
  sends the index to the other ranks; each rank checks the checkpoint's tensor keys and shapes
  against its own;
* **during the load** (``CheckedReader``) each item DCP reads is checked, every record's CRC-32:
  the shard is mapped, the CRC pass brings the item's pages in and ``torch.load`` copies them into
  the tensors from there, so each byte comes from the disk once and nothing is copied twice.

Damage is a ``DamagedCheckpointError`` naming the file (a resume that picked the folder falls back
to the previous good checkpoint, as for single files); a model that does not fit is a
``CheckpointError`` naming the folder and the keys. A folder written before ``.metadata.crc32``
existed gets every check but the index's checksum.
"""
from __future__ import annotations

import mmap
import os
import pickle
import zlib
from pathlib import Path
from typing import Any

from .file import BufferReader, CheckpointError, DamagedCheckpointError, damaged_archive, disk_full_error, write_text

METADATA = ".metadata"
INDEX_CRC = ".metadata.crc32"
SHOWN = 6  # keys named per kind of mismatch; the message says how many more


def record_index(folder: Path) -> None:
    """Rank 0, once DCP wrote ``.metadata`` and before the folder is committed: its checksum beside it."""
    data = (folder / METADATA).read_bytes()
    write_text(folder / INDEX_CRC, f"{zlib.crc32(data):08x} {len(data)}\n")


def read_index(folder: Path) -> Any:
    """DCP's index of ``folder``, after checking it against its checksum and the shards against it."""
    path = folder / METADATA
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DamagedCheckpointError(f"checkpoint folder {folder} has no {METADATA}: it is not a complete DCP "
                                     "checkpoint") from None
    problem = _index_problem(folder, data)
    if problem is None:
        try:
            metadata = pickle.loads(data)
            storage = dict(metadata.storage_data)
        except Exception as exc:
            problem = f"it cannot be read ({type(exc).__name__}: {exc})"
    if problem is not None:
        raise DamagedCheckpointError(f"checkpoint {folder} cannot be read, its index {path} is damaged: {problem}; "
                                     "use an earlier checkpoint")
    check_shards(folder, storage)
    return metadata


def looks_whole(folder: Path) -> str | None:
    """Why the folder's index is not whole, from sizes alone (None when it looks whole): no ``.metadata``, or
    one whose length is not the recorded one. The load checks the rest."""
    try:
        size = (folder / METADATA).stat().st_size
    except FileNotFoundError:
        return f"checkpoint folder {folder} has no {METADATA}: it is not a complete DCP checkpoint"
    recorded, problem = _recorded_checksum(folder)
    if problem is not None:
        return f"checkpoint {folder}: {problem}"
    if recorded is not None and recorded[1:2] != [str(size)]:
        return (f"checkpoint {folder}: the size of its index {folder / METADATA}, {size} bytes, does not match "
                f"the one recorded in {INDEX_CRC} ({' '.join(recorded)})")
    return None


def _index_problem(folder: Path, data: bytes) -> str | None:
    recorded, problem = _recorded_checksum(folder)
    if recorded is None:
        return problem
    actual = [f"{zlib.crc32(data):08x}", str(len(data))]
    if recorded != actual:
        return f"CRC-32 and size {' '.join(actual)} do not match those recorded in {INDEX_CRC} ({' '.join(recorded)})"
    return None


def _recorded_checksum(folder: Path) -> tuple[list[str] | None, str | None]:
    """The index's CRC-32 and size as recorded at the commit, or why they cannot be read; (None, None) for a
    folder written before the checksum existed."""
    try:
        return (folder / INDEX_CRC).read_text().split(), None
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"its checksum {INDEX_CRC} cannot be read ({exc})"


def check_shards(folder: Path, storage: dict[Any, Any]) -> None:
    """Each shard file the index names exists and holds every item the index places in it."""
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = folder / name
        try:
            actual = shard.stat().st_size
        except FileNotFoundError:
            raise DamagedCheckpointError(f"checkpoint {folder} cannot be read: its shard {shard} is missing; use an "
                                         "earlier checkpoint") from None
        if actual < size:
            what = "empty" if actual == 0 else f"truncated ({actual} bytes, its index places {size})"
            raise DamagedCheckpointError(f"checkpoint {folder} cannot be read: its shard {shard} is {what}; use an "
                                         "earlier checkpoint")


def check_fits(folder: Path, metadata: Any, states: dict[str, dict[str, Any]]) -> None:
    """The checkpoint's tensors against the run's, by name and shape, before anything is loaded.

    ``states`` is what DCP will load into (``{"model": ..., "optimizer": ...}``); their tensors'
    shapes are global (a DTensor's, not its shard's). Only tensors count: an optimizer's
    hyperparameters may differ between torch versions, and DCP itself names one that is missing.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    saved = {key: tuple(md.size) for key, md in metadata.state_dict_metadata.items()
             if isinstance(md, TensorStorageMetadata)}
    wanted = {key: tuple(value.shape) for key, value in _flat(states).items() if hasattr(value, "shape")}
    only_saved = sorted(set(saved) - set(wanted), key=_model_first)
    only_wanted = sorted(set(wanted) - set(saved), key=_model_first)
    shapes = [f"{key} {list(saved[key])} in the checkpoint, {list(wanted[key])} here"
              for key in sorted(set(saved) & set(wanted), key=_model_first) if saved[key] != wanted[key]]
    parts = [f"{what}: {_some(keys)}" for what, keys in (
        ("keys only in the checkpoint", only_saved), ("keys it does not have", only_wanted),
        ("shapes that differ", shapes)) if keys]
    if parts:
        raise CheckpointError(f"checkpoint {folder} does not fit this Trainer's model/optimizer: " + "; ".join(parts)
                              + "; it was saved by another model (load it into the model it was saved from)")


def _flat(states: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    return flatten_state_dict(states)[0]  # DCP's own names: "model.0.weight", "optimizer.state.0.weight.exp_avg"


def _model_first(key: str) -> tuple[bool, str]:
    return not key.startswith("model."), key


def _some(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def checked_reader(folder: Path, metadata: Any) -> Any:
    """DCP's ``FileSystemReader`` of ``folder`` that checks every item it reads (see the module docstring)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
            return metadata  # read and checked once, by read_index

        def _slice_file(self, file: Any, sinfo: Any) -> BufferReader:
            if getattr(self, "_mapped_file", None) is not file:  # DCP reads a file's items one after another
                self._mapped_file, self._mapped = file, _map(file)
            return BufferReader(read_item(folder, Path(file.name), self._mapped, sinfo))

    return CheckedReader(folder)


def _map(file: Any) -> memoryview:
    """The whole shard, mapped (an empty one as an empty buffer): pages are read once, when touched."""
    size = os.fstat(file.fileno()).st_size
    return memoryview(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)) if size else memoryview(b"")


def read_item(folder: Path, shard: Path, mapped: memoryview, sinfo: Any) -> memoryview:
    """One item of a mapped shard, checked: all its bytes there, and (for a plain ``torch.save`` item,
    which is all anndist writes) every record's CRC-32. The CRC pass brings the pages in; torch.load
    then copies them straight into the tensors: each byte is read from the disk once."""
    data = mapped[sinfo.offset:sinfo.offset + sinfo.length]
    if len(data) != sinfo.length:
        raise DamagedCheckpointError(f"checkpoint {folder} cannot be read: its shard {shard} is truncated (the item "
                                     f"at offset {sinfo.offset} has {len(data)} of its {sinfo.length} bytes)")
    problem = None if sinfo.transform_descriptors else damaged_archive(data)
    if problem is not None:
        raise DamagedCheckpointError(f"checkpoint {folder} cannot be read, its shard {shard} is damaged: the item at "
                                     f"offset {sinfo.offset} ({sinfo.length} bytes): {problem}; use an earlier "
                                     "checkpoint")
    return data


def failure(exc: BaseException, path: Path, doing: str) -> Exception:
    """DCP's ``CheckpointException`` (a BaseException, naming no file) as an Exception naming ``path``.

    The same on every rank (the failures are gathered): the lowest failing rank's error, its class
    kept when it is anndist's own (a damaged shard), a full disk as ``OSError(ENOSPC)``.
    """
    failures = getattr(exc, "failures", None) or {}
    if not failures:
        return CheckpointError(f"{doing} checkpoint {path} failed: {exc}")
    rank = min(failures)
    error = failures[rank][0]
    where = f" (on rank {rank})" if len(failures) > 1 or rank != 0 else ""
    full = disk_full_error(error, path, where)
    if full is not None:
        return full
    if isinstance(error, CheckpointError):
        return type(error)(f"{error}{where}")
    return CheckpointError(f"{doing} checkpoint {path} failed{where}: {type(error).__name__}: {error}")
