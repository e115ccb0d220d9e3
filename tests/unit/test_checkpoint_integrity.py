"""A checkpoint damaged inside (same size, the archive whole) is refused, by loads and by ``latest``.

torch's zip reader does not check the CRC-32 that torch.save stores with every record, so without
anndist's own check a flipped byte inside a tensor loads as a wrong weight.
"""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch

from anndist import CheckpointError, latest_checkpoint, save_in_dir
from anndist.checkpoint.file import read_checkpoint
from support import flat_params
from support.scripts.ckpt_train import make_run


def record_of(path: Path, tensor: torch.Tensor) -> zipfile.ZipInfo:
    """The zip record of ``path`` that holds ``tensor``'s bytes."""
    wanted = tensor.detach().contiguous().numpy().tobytes()
    with zipfile.ZipFile(path) as archive:
        return next(info for info in archive.infolist() if archive.read(info) == wanted)


def flip_bytes_inside(path: Path, record: zipfile.ZipInfo, count: int = 4) -> None:
    """Invert ``count`` bytes in the middle of ``record``'s data, in place: same size, same zip directory."""
    with open(path, "r+b") as file:
        file.seek(record.header_offset + 26)  # the local header's file name and extra field lengths
        name_len, extra_len = struct.unpack("<HH", file.read(4))
        start = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
        file.seek(start)
        data = file.read(count)
        file.seek(start)
        file.write(bytes(b ^ 0xFF for b in data))


def test_flipped_bytes_in_a_weight_are_refused_and_latest_falls_back(tmp_path, warnings):
    trainer, train_loader, val_loader = make_run([])
    for epochs in (1, 2):
        trainer.fit(train_loader, epochs, val_loader=val_loader)
        save_in_dir(trainer, tmp_path)
    newest = tmp_path / "step-000000026.ckpt"
    size = newest.stat().st_size
    weight = record_of(newest, trainer.module[0].weight)
    flip_bytes_inside(newest, weight)
    assert newest.stat().st_size == size and zipfile.is_zipfile(newest)

    fresh, _, _ = make_run([])
    with pytest.raises(CheckpointError, match="cannot be read, it is damaged") as info:
        fresh.load_checkpoint(newest)
    assert str(newest) in str(info.value) and weight.filename in str(info.value) and "CRC-32" in str(info.value)
    assert fresh.global_step == 0  # nothing half-loaded
    with pytest.raises(CheckpointError, match="damaged"):
        read_checkpoint(newest, mmap=True)  # the mapped read checks the data too

    # Choosing reads no data (the zip directory is whole): the load finds the damage and falls back.
    assert latest_checkpoint(tmp_path) == newest
    resumed, train_loader, _ = make_run([], checkpoint_dir=tmp_path, auto_resume=True)
    resumed.fit(train_loader, 1)  # resumes after epoch 0 from the older file: nothing left to train
    assert resumed.global_step == 13
    assert any(str(newest) in w and "CRC-32" in w for w in warnings)
    again, train_loader, _ = make_run([])
    again.fit(train_loader, 1)
    assert torch.equal(flat_params(resumed.module), flat_params(again.module))


def test_damage_in_the_pickle_names_its_record(tmp_path):
    trainer, train_loader, _ = make_run([])
    trainer.fit(train_loader, 1)
    good = trainer.save_checkpoint(tmp_path / "good.ckpt")
    with zipfile.ZipFile(good) as archive:
        pickle = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    flip_bytes_inside(good, pickle, count=1)
    with pytest.raises(CheckpointError, match=f"{good} cannot be read, it is damaged: .*data.pkl"):
        read_checkpoint(good)


def central_entry(data: bytes, name: str) -> int:
    """Offset of ``name``'s entry in the zip's central directory (46 fixed bytes, then the name)."""
    pos = data.index(b"PK\x01\x02")
    while data[pos:pos + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        if data[pos + 46:pos + 46 + name_len].decode() == name:
            return pos
        pos += 46 + name_len + extra_len + comment_len
    raise AssertionError(f"no entry {name}")


@pytest.mark.parametrize("damage", ["folder bit", "version needed", "disk count"])
def test_damage_in_the_zip_directory_is_a_checkpoint_error(tmp_path, damage):
    """Each found by flipping bits: torch read a record marked as a folder as nothing (a weight of
    uninitialised memory), and zipfile raised BadZipFile or NotImplementedError past latest_checkpoint."""
    trainer, train_loader, _ = make_run([])
    trainer.fit(train_loader, 1)
    path = trainer.save_checkpoint(tmp_path / "a.ckpt")
    data = bytearray(path.read_bytes())
    entry = central_entry(bytes(data), record_of(path, trainer.module[0].weight).filename)
    if damage == "folder bit":
        data[entry + 38] ^= 0x10  # external attributes: MS-DOS "directory"
    elif damage == "version needed":
        data[entry + 6] = 64  # zip 6.4, which zipfile does not implement
    else:
        data[data.index(b"PK\x06\x07") + 16] = 2  # the zip64 locator's number of disks
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint {path} cannot be read, it is damaged"):
        read_checkpoint(path)
    assert latest_checkpoint(tmp_path) is None  # skipped, with a warning, rather than raising


def test_files_are_written_with_crcs_even_when_torch_is_told_not_to(tmp_path):
    trainer, train_loader, _ = make_run([])
    trainer.fit(train_loader, 1)
    torch.serialization.set_crc32_options(False)
    try:
        path = trainer.save_checkpoint(tmp_path / "a.ckpt")
        assert torch.serialization.get_crc32_options() is False  # the user's setting is left as it was
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(path) as archive:
        assert all(info.CRC != 0 for info in archive.infolist() if info.file_size)
