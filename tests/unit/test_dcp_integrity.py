"""Sharded (DCP) checkpoint folders that are damaged, or of another model (issue 26, cases 3 and 4, and
the weak DCP items), in one process: ``strategy="fsdp"`` and DDP with ``async_checkpoint=True`` both
save folders. The two-rank cases are in ``test_lost_two_ranks.py``.

A flipped byte inside a shard, a truncated, empty or missing shard, a flipped byte in ``.metadata``:
loading the folder is a ``CheckpointError`` naming the file; ``auto_resume`` falls back to the
previous good checkpoint and ends bit-identical to an uninterrupted run. A folder of a model with one
more layer, or of another width: a ``CheckpointError`` naming the folder and the keys, nothing loaded.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import CheckpointError, ModelCheckpoint, Trainer, latest_checkpoint
from support import flat_params, make_dataset, make_model
from support.damage import flip, flip_inside_a_weight

MODES = {"fsdp": {"strategy": "fsdp"}, "ddp-async": {"async_checkpoint": True}}


def _trainer(options, folder=None, model=None, **extra):
    model = model if model is not None else make_model(dropout=0.2)
    callbacks = [ModelCheckpoint(every_n_steps=4, every_n_epochs=None, keep_last=None)] if folder else []
    return Trainer(model, torch.optim.AdamW(model.parameters(), lr=0.01), nn.CrossEntropyLoss(), seed=0,
                   checkpoint_dir=folder, callbacks=callbacks, progress_bar=False, handle_signals=False,
                   **options, **extra)


def _loader():
    return DataLoader(make_dataset(64), batch_size=8, shuffle=True)  # 8 steps per epoch


@pytest.fixture(scope="module", params=list(MODES))
def saved(request, tmp_path_factory):
    """Epoch 0 saved at steps 4 and 8 (``latest`` names step 8); the uninterrupted run's final weights."""
    options = MODES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    first = _trainer(options, root / "pristine")
    first.fit(_loader(), num_epochs=1)
    first.close()
    full = _trainer(options)
    full.fit(_loader(), num_epochs=2)
    return options, root / "pristine", flat_params(full.module)


def _copy(tmp_path, saved):
    import shutil
    folder = tmp_path / "ckpt"
    shutil.copytree(saved[1], folder, copy_function=shutil.copy2)
    return folder


def _damage(checkpoint, how):
    shard = checkpoint / "__0_0.distcp"
    if how == "flipped-byte-in-a-weight":
        return flip_inside_a_weight(checkpoint), "fails its CRC-32 check"
    if how == "truncated-shard":
        os.truncate(shard, shard.stat().st_size // 2)
        return shard, "is truncated"
    if how == "empty-shard":
        os.truncate(shard, 0)
        return shard, "is empty"
    if how == "missing-shard":
        shard.unlink()
        return shard, "is missing"
    index = checkpoint / ".metadata"
    flip(index, index.stat().st_size // 2)
    return index, "do not match those recorded"


DAMAGE = ["flipped-byte-in-a-weight", "truncated-shard", "empty-shard", "missing-shard", "flipped-byte-in-metadata"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_folder_is_named_and_auto_resume_takes_the_previous_one(tmp_path, saved, how, warnings):
    options, _, uninterrupted = saved
    folder = _copy(tmp_path, saved)
    newest = folder / "step-000000008.ckpt"
    damaged, problem = _damage(newest, how)
    with pytest.raises(CheckpointError, match=rf"{newest}.*{damaged}.*{problem}"):
        _trainer(options).load_checkpoint(newest)
    with pytest.raises(CheckpointError, match=rf"{damaged}.*{problem}"):  # named explicitly: no fallback
        _trainer(options).fit(_loader(), num_epochs=2, resume_from=newest)
    if how != "flipped-byte-in-a-weight":  # seen without reading a shard: latest skips it at once
        assert latest_checkpoint(folder).name == "step-000000004.ckpt"
    resumed = _trainer(options, folder, auto_resume=True)
    resumed.fit(_loader(), num_epochs=2)
    assert any(str(damaged) in w and problem in w for w in warnings), warnings
    assert resumed.history["train_loss"][0] is not None and resumed.global_step == 16
    assert torch.equal(flat_params(resumed.module), uninterrupted)  # resumed at step 4, bit for bit


def test_damage_in_the_only_checkpoint_is_an_error_not_a_fresh_start(tmp_path, saved):
    options = saved[0]
    folder = _copy(tmp_path, saved)
    (folder / "step-000000004.ckpt").rename(folder / ".gone.tmp")
    damaged, problem = _damage(folder / "step-000000008.ckpt", "flipped-byte-in-a-weight")
    trainer = _trainer(options, folder, auto_resume=True)
    with pytest.raises(CheckpointError, match="no good checkpoint left"):  # its model holds part of step 8
        trainer.fit(_loader(), num_epochs=2)


@pytest.mark.parametrize("other", ["one-more-layer", "wider"])
def test_a_folder_of_another_model_is_refused_naming_the_keys(tmp_path, saved, other):
    options = saved[0]
    if other == "one-more-layer":
        bigger = make_model(dropout=0.2)
        bigger.append(nn.Linear(3, 3))
        expected = r"keys only in the checkpoint: model\.4\.bias, model\.4\.weight, optimizer\.state\.4\.bias\.exp_avg, "
    else:
        bigger = make_model(hidden=32, dropout=0.2)
        expected = (r"shapes that differ: model\.0\.bias \[32\] in the checkpoint, \[16\] here, "
                    r"model\.0\.weight \[32, 8\] in the checkpoint, \[16, 8\] here")
    writer = _trainer(options, model=bigger)
    writer.fit(_loader(), num_epochs=1)
    path = writer.save_checkpoint(tmp_path / "bigger.ckpt")
    writer.close()  # an asynchronous save is committed
    trainer = _trainer(options)
    before = flat_params(trainer.module)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} does not fit this Trainer's model/optimizer: "
                                              rf"{expected}"):
        trainer.fit(_loader(), num_epochs=2, resume_from=path)
    assert torch.equal(flat_params(trainer.module), before) and trainer.global_step == 0  # nothing loaded
