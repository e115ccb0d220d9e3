"""Asynchronous checkpoints under strategy="ddp" in one process: DCP folders saved, resumed and consolidated;
FSDP refuses a single-file checkpoint. On 2 ranks: tests/multiprocess/test_ddp_async_checkpoint.py."""
from __future__ import annotations

import pytest
import torch

from anndist.callbacks import ModelCheckpoint
from anndist.checkpoint import CheckpointError, latest_checkpoint
from support.dcp_runs import dcp_loader, dcp_trainer


def test_one_process_saves_resumes_and_consolidates(tmp_path):
    from anndist.consolidate import consolidate
    folder = tmp_path / "ckpt"
    straight = dcp_trainer(True, strategy="ddp")
    straight.fit(dcp_loader(), max_steps=30)
    saving = dcp_trainer(True, [ModelCheckpoint(folder, every_n_steps=20, every_n_epochs=None)], strategy="ddp")
    saving.save_checkpoint(tmp_path / "before.ckpt")  # before the first step: DCP initialises AdamW's state...
    saving.fit(dcp_loader(), max_steps=30)
    saving.close()  # waits for the save in flight
    for name, value in straight.module.state_dict().items():  # ...and anndist drops it again: same run
        assert torch.equal(saving.module.state_dict()[name], value), name
    assert latest_checkpoint(folder) == folder / "step-000000020.ckpt"
    assert (folder / "step-000000020.ckpt" / ".metadata").is_file()
    resumed = dcp_trainer(True, strategy="ddp", checkpoint_dir=folder, auto_resume=True)
    resumed.fit(dcp_loader(), max_steps=30)
    assert resumed.global_step == 30
    for name, value in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[name], value), name
    assert {"model", "optimizer"} <= set(resumed.state_dict())  # DDP still holds them whole
    weights = torch.load(consolidate(folder, tmp_path / "model.pt"), weights_only=True)
    at_20 = dcp_trainer(False, strategy="ddp")
    at_20.load_checkpoint(folder / "step-000000020.ckpt")
    assert all(torch.equal(weights[name], value) for name, value in at_20.module.state_dict().items())


def test_fsdp_refuses_a_single_file_checkpoint_instead_of_ignoring_its_weights(tmp_path):
    ddp = dcp_trainer(False, strategy="ddp")
    ddp.fit(dcp_loader(), max_steps=2)
    path = ddp.save_checkpoint(tmp_path / "one.ckpt")
    with pytest.raises(CheckpointError, match=r"is a single file .* \['model', 'optimizer'\]"):
        dcp_trainer(False).load_checkpoint(path)
