"""Sharded (DCP) checkpoints under strategy="fsdp": bit-identical resume on 2 ranks (sync and async saves,
through ModelCheckpoint, from the last save, from one taken while training went on, and through
PreemptionCallback), ModelCheckpoint's best and pruning, 1 -> 2 and 2 -> 1 reshards that train on, the
consolidation into one file. The runs are shared with the DDP tests of test_ddp_async_checkpoint.py
through support/dcp_runs.py; kill -9 during async saves: tests/e2e/test_fsdp_checkpoint.py."""
from __future__ import annotations

import math
import signal

import pytest
import torch

from anndist.callbacks import ModelCheckpoint, PreemptionCallback
from support import full_weights, run_spawn
from support.callbacks import SignalAt
from support.dcp_runs import StopAt, dcp_loader, dcp_model, dcp_trainer, stop_and_resume


def _preempted(folder: str, async_save: bool) -> dict:
    """SIGUSR1 on rank 1 after step 3: every rank stops after step 4 (mid-epoch), PreemptionCallback saves
    the sharded checkpoint; a new Trainer with auto_resume goes on to step 14."""
    stopped = dcp_trainer(async_save, [SignalAt(signal.SIGUSR1, step=3, rank=1), PreemptionCallback(exit=False)],
                          checkpoint_dir=folder)
    stopped.fit(dcp_loader(), max_steps=14)
    position = (stopped.global_step, stopped.batch_in_epoch)
    stopped.close()  # an asynchronous save completes here
    resumed = dcp_trainer(async_save, checkpoint_dir=folder, auto_resume=True)
    resumed.fit(dcp_loader(), max_steps=14)
    return {"position": position, "weights": full_weights(resumed.module), "history": resumed.history}


def _best_and_pruning(folder: str) -> dict:
    """Epoch-end saves keeping the newest one, and best.ckpt by the highest train_loss (epoch 0's),
    which pruning removes as step-000000006.ckpt two saves later."""
    callback = ModelCheckpoint(folder, every_n_epochs=1, keep_last=1, monitor="train_loss", mode="max")
    trainer = dcp_trainer(False, [callback])
    trainer.fit(dcp_loader(), num_epochs=3)
    best = dcp_trainer(False)
    try:
        best.load_checkpoint(f"{folder}/best.ckpt")
    except Exception as exc:  # reported by the test, rather than failing the whole spawn
        return {"best_step": callback.best_step, "best_loaded": repr(exc), "steps": trainer.global_step}
    return {"best_step": callback.best_step, "best_loaded": best.global_step, "steps": trainer.global_step}


def _from_one_process(folder: str) -> dict:
    """The checkpoint one process wrote (nothing sharded), loaded on 2 ranks; then 5 more steps."""
    two = dcp_trainer(False)
    two.load_checkpoint(f"{folder}/one.ckpt")
    loaded, step = full_weights(two.module), two.global_step
    two.fit(dcp_loader(), max_steps=step + 5)
    return {"loaded": loaded, "step": step, "after": two.global_step, "trained": full_weights(two.module),
            "history": two.history}


def _scenarios(rank: int, world_size: int, folder: str, async_save: bool) -> dict:
    out = stop_and_resume(rank, world_size, f"{folder}/run", async_save)
    out["preempted"] = _preempted(f"{folder}/preempt", async_save)
    if not async_save:  # once is enough
        out["best"] = _best_and_pruning(f"{folder}/best")
        out["from_one"] = _from_one_process(f"{folder}/one")
    return out


def _save_in_one_process(folder) -> dict[str, torch.Tensor]:
    """strategy='fsdp' without a process group: stopped after 4 steps (mid-epoch), saved as a DCP folder."""
    one = dcp_trainer(False, [StopAt(4)])
    one.fit(dcp_loader(), max_steps=12)
    assert (one.global_step, one.batch_in_epoch) == (4, 8)  # of 24 micro-batches on one rank
    one.save_in_dir(folder, "one")
    return {k: v.detach().clone() for k, v in one.module.state_dict().items()}


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def two_ranks(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_ckpt")
    saved_by_one = None if request.param else _save_in_one_process(root / "one")
    ranks = run_spawn(_scenarios, 2, str(root), request.param)
    return root / "run", request.param, ranks, root, saved_by_one


def test_resume_on_two_ranks_is_bit_identical(two_ranks):
    folder, _, ranks, _, _ = two_ranks
    for out in ranks:
        for name, value in out["straight"].items():
            assert torch.equal(out["resumed"][name], value), name
            assert torch.equal(out["from_step_8"][name], value), name
        assert out["history"][0]["train_loss"] == out["history"][1]["train_loss"]
        assert out["blocked"] >= 0
    written = sorted(p.name for p in folder.iterdir())
    assert written == ["latest", "step-000000004.ckpt", "step-000000008.ckpt", "stop.ckpt"]
    shard_files = sorted(p.name for p in (folder / "stop.ckpt").iterdir())
    assert shard_files == [".metadata", ".metadata.crc32", "__0_0.distcp", "__1_0.distcp", "run.ckpt"]
    assert (folder / "latest").read_text().strip() == "stop.ckpt"


def test_two_to_one_reshards_and_trains_on(two_ranks):
    folder, async_save, ranks, _, _ = two_ranks
    if async_save:
        pytest.skip("one reshard is enough")
    one = dcp_trainer(False)  # this process: one rank, no process group
    one.load_checkpoint(folder / "step-000000008.ckpt")
    assert one.global_step == 8
    loaded = {k: v.clone() for k, v in one.module.state_dict().items()}
    for name, value in ranks[0]["at_8"].items():  # what the 2 ranks held at step 8, gathered
        assert torch.equal(loaded[name], value), name
    one.fit(dcp_loader(), max_steps=13)  # 2 ranks' position rescaled to 1 rank: mid-epoch, then on
    assert one.global_step == 13
    assert any(not torch.equal(loaded[k], v) for k, v in one.module.state_dict().items())  # it trained on


def test_one_to_two_reshards_and_trains_on(two_ranks):
    """Saved by one process (a DCP folder, nothing sharded), loaded on 2 ranks: the same weights once
    gathered, the position rescaled (4 steps in), then 5 more steps with finite losses."""
    _, async_save, ranks, root, saved = two_ranks
    if async_save:
        pytest.skip("one reshard is enough")
    assert sorted(p.name for p in (root / "one" / "one.ckpt").iterdir()) == [".metadata", ".metadata.crc32", "__0_0.distcp", "run.ckpt"]
    for out in (r["from_one"] for r in ranks):
        assert out["step"] == 4 and out["after"] == 9
        for name, value in saved.items():
            assert torch.equal(out["loaded"][name], value), name
        assert any(not torch.equal(out["trained"][k], v) for k, v in saved.items())  # it trained on
        assert out["history"]["train_loss"] and all(math.isfinite(x) for x in out["history"]["train_loss"])
    for name in saved:
        assert torch.equal(ranks[0]["from_one"]["trained"][name], ranks[1]["from_one"]["trained"][name])


def test_preemption_saves_a_sharded_checkpoint_and_resumes_bit_identical(two_ranks):
    """PreemptionCallback under FSDP: a signal on one rank, an agreed stop mid-epoch, the save on every
    rank (a DCP folder, `latest` naming it), and auto_resume ends where the uninterrupted run ends."""
    _, _, ranks, root, _ = two_ranks
    folder = root / "preempt"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-000000004.ckpt"]
    assert (folder / "latest").read_text().strip() == "step-000000004.ckpt"
    assert (folder / "step-000000004.ckpt" / "__1_0.distcp").is_file()
    for out in ranks:
        assert out["preempted"]["position"] == (4, 8)  # stopped after step 4, 8 of 12 micro-batches in
        for name, value in out["straight"].items():
            assert torch.equal(out["preempted"]["weights"][name], value), name
        assert out["preempted"]["history"]["train_loss"] == out["history"][0]["train_loss"]


def test_model_checkpoint_keeps_best_through_pruning_and_moves_latest(two_ranks):
    _, async_save, ranks, root, _ = two_ranks
    if async_save:
        pytest.skip("once is enough")
    folder = root / "best"
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "latest", "step-000000018.ckpt"]
    assert (folder / "best.ckpt").is_dir() and not (folder / "best.ckpt").is_symlink()
    assert (folder / "latest").read_text().strip() == "step-000000018.ckpt"
    for out in (r["best"] for r in ranks):
        assert out["steps"] == 18 and out["best_step"] == 6  # epoch 0's loss is the highest
        assert out["best_loaded"] == 6  # best.ckpt outlived step-000000006.ckpt, which pruning removed


def test_consolidate_gives_the_full_model(two_ranks, tmp_path):
    from anndist.consolidate import main
    folder, async_save, ranks, _, _ = two_ranks
    if async_save:
        pytest.skip("once is enough")
    out = tmp_path / "model.pt"
    assert main([str(folder / "step-000000008.ckpt"), str(out)]) == 0
    state = torch.load(out, weights_only=True)
    model = dcp_model()
    model.load_state_dict(state)  # every key, the full shapes
    one = dcp_trainer(False)
    one.load_checkpoint(folder / "step-000000008.ckpt")
    for name, value in one.module.state_dict().items():
        assert torch.equal(state[name], value)
