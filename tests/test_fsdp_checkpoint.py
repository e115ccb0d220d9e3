"""Sharded (DCP) checkpoints under strategy="fsdp": bit-identical resume on 2 ranks (sync and async saves,
through ModelCheckpoint, from the last save, from one taken while training went on, and through
PreemptionCallback), ModelCheckpoint's best and pruning, 1 -> 2 and 2 -> 1 reshards that train on, the
consolidation into one file, and kill -9 during async saves (shared with the DDP tests in
test_ddp_async_checkpoint.py)."""
from __future__ import annotations

import math
import shutil
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Trainer
from anndist.callbacks import Callback, ModelCheckpoint, PreemptionCallback
from models import make_dataset
from spawn_ranks import run_spawn
from test_fsdp import full_weights
from test_preemption import SignalAt


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))


def _trainer(async_save: bool, callbacks=(), strategy: str = "fsdp", **options) -> Trainer:
    model = _model()
    sharding = {"shard_modules": lambda m: isinstance(m, nn.Linear)} if strategy == "fsdp" else {}
    return Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), nn.CrossEntropyLoss(), strategy=strategy,
                   **sharding, async_checkpoint=async_save, seed=0,
                   progress_bar=False, handle_signals=False, callbacks=list(callbacks),
                   scheduler=None, gradient_accumulation_steps=2,
                   stop_check_period=0,  # the stop lands at a known step (10), not up to 0.25 s of steps later
                   **options)


def _loader() -> DataLoader:
    return DataLoader(make_dataset(96), batch_size=4, shuffle=True)  # 12 micro-batches per rank per epoch


class StopAt(Callback):
    """Stops the run mid-epoch, as a preemption would (all ranks agree on the step)."""

    def __init__(self, step: int = 9) -> None:
        self.step = step

    def on_batch_end(self, batch_idx, trainer=None, logs=None):
        if trainer.global_step >= self.step:
            trainer.stop_training = True


class WeightsAt(Callback):
    """The whole weights (gathered on every rank) after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step, self.weights = step, None

    def on_batch_end(self, batch_idx, trainer=None, logs=None):
        if logs["ends_window"] and trainer.global_step == self.step and self.weights is None:
            self.weights = full_weights(trainer.module)


def _resume(rank: int, world_size: int, folder: str, async_save: bool, strategy: str = "fsdp") -> dict:
    straight = _trainer(async_save, strategy=strategy)
    straight.fit(_loader(), max_steps=14)
    # Saved every 4 steps by ModelCheckpoint (2 kept); stopped at step 10 on 2 ranks (the flag set after
    # step 9 is read one proposal later), mid-epoch (6 steps per epoch).
    at_8 = WeightsAt(8)
    stopped = _trainer(async_save, [ModelCheckpoint(folder, every_n_steps=4, every_n_epochs=None, keep_last=2),
                                    StopAt(), at_8], strategy)
    stopped.fit(_loader(), max_steps=14)
    assert stopped.global_step == 10 and stopped.batch_in_epoch == 8
    stopped.save_in_dir(folder, "stop")
    stopped.close()
    resumed = _trainer(async_save, strategy=strategy)
    resumed.fit(_loader(), max_steps=14, resume_from=f"{folder}/stop.ckpt")
    # Step 8 was saved while training went on (an asynchronous save's staging must have copied the state).
    from_step_8 = _trainer(async_save, strategy=strategy)
    from_step_8.fit(_loader(), max_steps=14, resume_from=f"{folder}/step-000000008.ckpt")
    return {"straight": full_weights(straight.module), "resumed": full_weights(resumed.module),
            "from_step_8": full_weights(from_step_8.module), "history": (straight.history, resumed.history),
            "blocked": stopped.run_state.sharded.last_blocked_s, "at_8": at_8.weights}


def _preempted(folder: str, async_save: bool) -> dict:
    """SIGUSR1 on rank 1 after step 3: every rank stops after step 4 (mid-epoch), PreemptionCallback saves
    the sharded checkpoint; a new Trainer with auto_resume goes on to step 14."""
    stopped = _trainer(async_save, [SignalAt(signal.SIGUSR1, step=3, rank=1), PreemptionCallback(exit=False)],
                       checkpoint_dir=folder)
    stopped.fit(_loader(), max_steps=14)
    position = (stopped.global_step, stopped.batch_in_epoch)
    stopped.close()  # an asynchronous save completes here
    resumed = _trainer(async_save, checkpoint_dir=folder, auto_resume=True)
    resumed.fit(_loader(), max_steps=14)
    return {"position": position, "weights": full_weights(resumed.module), "history": resumed.history}


def _best_and_pruning(folder: str) -> dict:
    """Epoch-end saves keeping the newest one, and best.ckpt by the highest train_loss (epoch 0's),
    which pruning removes as step-000000006.ckpt two saves later."""
    callback = ModelCheckpoint(folder, every_n_epochs=1, keep_last=1, monitor="train_loss", mode="max")
    trainer = _trainer(False, [callback])
    trainer.fit(_loader(), num_epochs=3)
    best = _trainer(False)
    try:
        best.load_checkpoint(f"{folder}/best.ckpt")
    except Exception as exc:  # reported by the test, rather than failing the whole spawn
        return {"best_step": callback.best_step, "best_loaded": repr(exc), "steps": trainer.global_step}
    return {"best_step": callback.best_step, "best_loaded": best.global_step, "steps": trainer.global_step}


def _from_one_process(folder: str) -> dict:
    """The checkpoint one process wrote (nothing sharded), loaded on 2 ranks; then 5 more steps."""
    two = _trainer(False)
    two.load_checkpoint(f"{folder}/one.ckpt")
    loaded, step = full_weights(two.module), two.global_step
    two.fit(_loader(), max_steps=step + 5)
    return {"loaded": loaded, "step": step, "after": two.global_step, "trained": full_weights(two.module),
            "history": two.history}


def _scenarios(rank: int, world_size: int, folder: str, async_save: bool) -> dict:
    out = _resume(rank, world_size, f"{folder}/run", async_save)
    out["preempted"] = _preempted(f"{folder}/preempt", async_save)
    if not async_save:  # once is enough
        out["best"] = _best_and_pruning(f"{folder}/best")
        out["from_one"] = _from_one_process(f"{folder}/one")
    return out


def _save_in_one_process(folder) -> dict[str, torch.Tensor]:
    """strategy='fsdp' without a process group: stopped after 4 steps (mid-epoch), saved as a DCP folder."""
    one = _trainer(False, [StopAt(4)])
    one.fit(_loader(), max_steps=12)
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
    one = _trainer(False)  # this process: one rank, no process group
    one.load_checkpoint(folder / "step-000000008.ckpt")
    assert one.global_step == 8
    loaded = {k: v.clone() for k, v in one.module.state_dict().items()}
    for name, value in ranks[0]["at_8"].items():  # what the 2 ranks held at step 8, gathered
        assert torch.equal(loaded[name], value), name
    one.fit(_loader(), max_steps=13)  # 2 ranks' position rescaled to 1 rank: mid-epoch, then on
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


def test_a_folder_alias_is_hard_links_that_outlive_the_source(tmp_path):
    from anndist.checkpoint.sharded import link_folder
    first, second = tmp_path / "step-1.ckpt", tmp_path / "step-2.ckpt"
    for folder, text in ((first, "one"), (second, "two")):
        folder.mkdir()
        (folder / ".metadata").write_text(text)
        (folder / "__0_0.distcp").write_text(text)
    alias = tmp_path / "best.ckpt"
    link_folder(first, alias)
    assert not alias.is_symlink() and (alias / ".metadata").stat().st_ino == (first / ".metadata").stat().st_ino
    link_folder(second, alias)  # a new best replaces the old one
    assert (alias / "__0_0.distcp").read_text() == "two"
    shutil.rmtree(second)  # pruned, as keep_last does
    assert sorted(p.name for p in alias.iterdir()) == [".metadata", "__0_0.distcp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "step-1.ckpt"]  # no temporary left


def test_consolidate_gives_the_full_model(two_ranks, tmp_path):
    from anndist.consolidate import main
    folder, async_save, ranks, _, _ = two_ranks
    if async_save:
        pytest.skip("once is enough")
    out = tmp_path / "model.pt"
    assert main([str(folder / "step-000000008.ckpt"), str(out)]) == 0
    state = torch.load(out, weights_only=True)
    model = _model()
    model.load_state_dict(state)  # every key, the full shapes
    one = _trainer(False)
    one.load_checkpoint(folder / "step-000000008.ckpt")
    for name, value in one.module.state_dict().items():
        assert torch.equal(state[name], value)


def test_kill_9_during_async_saves_leaves_a_loadable_checkpoint(tmp_path):
    kill_9_during_async_saves(tmp_path, "fsdp")


def kill_9_during_async_saves(tmp_path, strategy: str) -> None:
    """SIGKILL to the whole torchrun job at random moments of back-to-back asynchronous saves (~2.1M
    parameters, ~25 MB a save), the job restarted each time with auto_resume: each time the latest
    checkpoint loads, and it moves forward."""
    import contextlib
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from anndist.checkpoint import latest_checkpoint
    from processes import ROOT, child_env
    from scripts.async_saves import model

    folder, previous = tmp_path / "ckpt", -1
    for trial in range(3):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "scripts" / "async_saves.py"), str(folder), strategy]
        with subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, start_new_session=True) as job:
            workers = []
            try:
                for line in job.stdout:
                    if line.startswith("pid "):
                        workers.append(int(line.split()[1]))
                    if line.strip() == "saved":
                        break
                time.sleep(random.Random(trial).uniform(0.0, 1.5))
            finally:
                for pid in workers + [job.pid]:  # kill -9 of every worker, as a node failure would
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        _wait_gone(workers)
        found = latest_checkpoint(folder)
        assert found is not None and (found / ".metadata").is_file()
        net = model()
        one = Trainer(net, torch.optim.AdamW(net.parameters(), lr=1e-3), nn.CrossEntropyLoss(), strategy=strategy,
                      seed=0, progress_bar=False, handle_signals=False)
        one.load_checkpoint(found)  # every shard and the run file are there and fit
        assert one.global_step >= previous + 3  # the restarted run resumed, trained and saved again
        previous = one.global_step


def _wait_gone(pids):
    import os
    import time
    for pid in pids:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
