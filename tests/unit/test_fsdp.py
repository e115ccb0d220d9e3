"""strategy="fsdp" in one process: Trainer.state_dict() round trip (nothing sharded), its options, the
default choice of shard groups. On 2 ranks: tests/multiprocess/test_fsdp.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Trainer
from support import make_dataset
from support.fsdp import deep_model, fsdp_trainer


def test_trainer_state_dict_round_trip_in_one_process():
    """strategy='fsdp' in one process (nothing sharded): the same whole form, loaded without a process group."""
    saved, fresh = fsdp_trainer(0), fsdp_trainer(1)
    saved.fit(DataLoader(make_dataset(32), batch_size=4), max_steps=3)
    state = saved.state_dict()
    assert sorted(state["optimizer"]["state"]) == sorted(deep_model().state_dict())
    fresh.load_state_dict(state)
    assert fresh.global_step == 3
    for name, value in saved.module.state_dict().items():
        assert torch.equal(fresh.module.state_dict()[name], value)


def test_options_are_checked_at_construction():
    model = deep_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="strategy='zero'"):
        Trainer(model, opt, nn.CrossEntropyLoss(), strategy="zero")
    with pytest.raises(TypeError, match="not parameters of fully_shard"):
        Trainer(model, opt, nn.CrossEntropyLoss(), strategy="fsdp", fsdp_kwargs={"reshard_after_fwd": True})
    with pytest.raises(ValueError, match="strategy='fsdp' only"):
        Trainer(model, opt, nn.CrossEntropyLoss(), shard_modules=lambda m: True)
    with pytest.raises(TypeError, match="shard_modules must be a function"):
        Trainer(model, opt, nn.CrossEntropyLoss(), strategy="fsdp", shard_modules=nn.Linear(1, 1).weight)
    with pytest.raises(ValueError, match="fp16"):
        Trainer(model, opt, nn.CrossEntropyLoss(), strategy="fsdp", use_amp=True, amp_dtype="fp16")


def test_default_choice_of_shard_groups():
    from anndist.strategies.fsdp import MIN_SHARD_PARAMS, choose_submodules
    big = MIN_SHARD_PARAMS // 1000 + 1
    blocks = nn.ModuleList([nn.Linear(1000, big) for _ in range(2)])
    model = nn.Module()
    model.embed, model.blocks, model.head = nn.Linear(1000, big), blocks, nn.Linear(2, 2)
    assert choose_submodules(model, None) == [model.embed, blocks[0], blocks[1]]
    assert choose_submodules(model, lambda m: m is model.head) == [model.head]
