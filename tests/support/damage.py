"""Damage done to a DCP checkpoint folder on purpose, for the integrity tests (one process and two ranks)."""
from __future__ import annotations

import io
import pickle
import zipfile


def shard_index(checkpoint):
    return pickle.loads((checkpoint / ".metadata").read_bytes())


def flip_inside_a_weight(checkpoint, shard="__0_0.distcp"):
    """Flip one byte inside the tensor data of ``model.0.weight``'s item in ``shard``: same size, archive whole."""
    for key, info in shard_index(checkpoint).storage_data.items():
        if key.fqn == "model.0.weight" and info.relative_path == shard:
            shard = checkpoint / info.relative_path
            item = shard.read_bytes()[info.offset:info.offset + info.length]
            record = next(r for r in zipfile.ZipFile(io.BytesIO(item)).infolist() if "/data/" in r.filename)
            start = record.header_offset + 30 + len(record.filename) + len(record.extra)
            flip(shard, info.offset + start + record.file_size // 2)
            return shard
    raise AssertionError("model.0.weight not in the index")


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
