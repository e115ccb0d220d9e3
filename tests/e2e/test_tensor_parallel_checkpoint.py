"""Checkpoints across layouts of the ranks: DCP folders written by a 2-D (dp x tp) run resume bit for bit on
the same layout (dropout, a shuffled loader, stopped mid-epoch), and train on after a change of layout
(4 FSDP -> 2x2 under torchrun; 2x2 -> 1x2 on 2 spawned ranks; 2x2 -> one process) to the weights of one
process trained on the same global batches; ``python -m anndist.consolidate`` turns a 2-D folder into one
file. (2x2 -> 4 DDP is the held-out check, in test_tensor_parallel.py.)"""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from anndist import Trainer
from support import run, run_spawn, torchrun, tp

TOL = 1e-5


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp_ckpt")
    torchrun("tests/support/scripts/tp_runs.py", "--out", str(out), "--runs", "resume_same_layout,fsdp_to_2d,fsdp_to_2d_dropout",
             nproc=4, timeout=280)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(4)]


def eight_steps() -> tuple[dict, dict]:
    """One process: the weights after 6 steps (8 global micro-batches, then 4) and after 2 more (4 more)."""
    module = tp.model()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    x, y = tp.data()
    tp.one_process(module, opt, tp.global_batches(x, y, 0, 8), 2)
    tp.one_process(module, opt, tp.global_batches(x, y, 8, 4), 2)
    six = {k: v.clone() for k, v in module.state_dict().items()}
    tp.one_process(module, opt, tp.global_batches(x, y, 12, 4), 2)
    return six, module.state_dict()


def test_same_layout_resume_is_bit_identical(launched):
    for out in launched[1]:
        same = out["resume_same_layout"]
        assert same["position"] == (4, 8)  # stopped mid-epoch (16 micro-batches per rank per epoch)
        assert all(torch.equal(same["straight"][k], same["resumed"][k]) for k in same["straight"])
        assert same["history"][0] == same["history"][1]
        # dropout inside the split blocks: the ranks of a tensor-parallel group drew the same masks
        first = launched[1][0]["resume_same_layout"]["straight"]
        assert all(torch.equal(first[k], same["straight"][k]) for k in first)


def test_a_new_layout_gives_each_tensor_parallel_group_one_rng_stream(launched):
    first = launched[1][0]["fsdp_to_2d_dropout"]
    for out in launched[1]:
        assert out["fsdp_to_2d_dropout"]["steps"] == 4
        assert all(torch.equal(first["weights"][k], out["fsdp_to_2d_dropout"]["weights"][k]) for k in first["weights"])


def test_four_fsdp_ranks_to_2d(launched):
    six, _ = eight_steps()
    for out in launched[1]:
        assert out["fsdp_to_2d"]["steps"] == 6
        assert tp.max_diff(out["fsdp_to_2d"]["six"], six) < TOL


def _continue(rank: int, world_size: int, folder: str, tp_size: int) -> dict:
    """Load the 2x2 run's step-6 folder on this layout, train steps 7 and 8 on global micro-batches 12..15."""
    module = tp.model(seed=1)
    options = {"tp_size": tp_size, "tp_plan": tp.PLAN} if tp_size > 1 else {}
    trainer = Trainer(module, torch.optim.AdamW(module.parameters(), lr=1e-2), nn.CrossEntropyLoss(), seed=0,
                      gradient_accumulation_steps=2, progress_bar=False, handle_signals=False, **options)
    x, y = tp.data()
    batches = tp.rank_batches(tp.global_batches(x, y, 12, 4), trainer.strategy.data_rank,
                              trainer.strategy.data_world_size)
    trainer.fit(batches, num_epochs=3, resume_from=folder)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(trainer.module, options=StateDictOptions(full_state_dict=True))
    return {"weights": {k: v.detach().clone() for k, v in weights.items()}, "steps": trainer.global_step,
            "data": trainer.strategy.data_world_size}


def _mid_epoch_on_ddp(folder: str) -> dict:
    """The 2x2 checkpoint saved after step 4 of 8 (mid-epoch) goes on under 2-rank DDP (2 data shards)."""
    module = tp.model(seed=1)
    trainer = Trainer(module, torch.optim.SGD(module.parameters(), lr=0.1), nn.CrossEntropyLoss(), seed=0,
                      gradient_accumulation_steps=2, progress_bar=False, handle_signals=False)
    x, y = tp.data()
    trainer.fit(DataLoader(TensorDataset(x, y), batch_size=4), num_epochs=1, resume_from=folder)
    return {"weights": {k: v.detach().clone() for k, v in trainer.module.state_dict().items()},
            "history": trainer.history, "steps": trainer.global_step}


def _on_two_ranks(rank: int, world_size: int, root: str) -> dict:
    return {"1x2": _continue(rank, world_size, f"{root}/two_d/six.ckpt", 2),
            "mid_epoch": _mid_epoch_on_ddp(f"{root}/mid/mid.ckpt")}


@pytest.fixture(scope="module")
def two_ranks(launched):
    return run_spawn(_on_two_ranks, 2, str(launched[0]), timeout=240)


def test_2d_to_1x2_on_two_ranks(two_ranks):
    _, eight = eight_steps()
    for result in two_ranks:
        assert result["1x2"]["steps"] == 8 and result["1x2"]["data"] == 1
        assert tp.max_diff(result["1x2"]["weights"], eight) < TOL


def test_2d_mid_epoch_to_ddp_ends_the_epoch_as_one_process(two_ranks):
    """Position, weights and the epoch's train_loss (its first half summed by the 2x2 run's ranks, counted
    once per data shard, not once per tensor-parallel rank) equal one process's."""
    module, losses = tp.model(), []
    x, y = tp.data()
    tp.one_process(module, torch.optim.SGD(module.parameters(), lr=0.1), tp.global_batches(x, y, 0, 16), 2,
                   losses=losses)
    for result in two_ranks:
        mid = result["mid_epoch"]
        assert mid["steps"] == 8
        assert tp.max_diff(mid["weights"], module.state_dict()) < TOL
        assert mid["history"]["train_loss"][0] == pytest.approx(sum(losses) / len(losses), abs=TOL)


def test_2d_to_one_process(launched):
    _, eight = eight_steps()
    result = _continue(0, 1, str(launched[0] / "two_d" / "six.ckpt"), 1)
    assert result["steps"] == 8
    assert tp.max_diff(result["weights"], eight) < TOL


def test_consolidate_turns_a_2d_folder_into_one_file(launched, tmp_path):
    six, _ = eight_steps()
    run([sys.executable, "-m", "anndist.consolidate", str(launched[0] / "two_d" / "six.ckpt"), str(tmp_path / "m.pt")])
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert all(type(v) is torch.Tensor for v in state.values())
    assert tp.max_diff(state, six) < TOL
    tp.model().load_state_dict(state)  # a plain model takes it as it is
