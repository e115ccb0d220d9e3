"""Sharded (DCP) checkpoints under strategy="fsdp": bit-identical resume on 2 ranks (sync and async saves,
through ModelCheckpoint, from the last save and from one taken while training went on), a 2 -> 1 reshard
that trains on, the consolidation into one file, and kill -9 during async saves (shared with the DDP
tests in test_ddp_async_checkpoint.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Trainer
from anndist.callbacks import Callback, ModelCheckpoint
from models import make_dataset
from spawn_ranks import run_spawn
from test_fsdp import full_weights


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

    def on_batch_end(self, batch_idx, trainer=None, logs=None):
        if trainer.global_step >= 9:
            trainer.stop_training = True


def _resume(rank: int, world_size: int, folder: str, async_save: bool, strategy: str = "fsdp") -> dict:
    straight = _trainer(async_save, strategy=strategy)
    straight.fit(_loader(), max_steps=14)
    # Saved every 4 steps by ModelCheckpoint (2 kept); stopped at step 10 on 2 ranks (the flag set after
    # step 9 is read one proposal later), mid-epoch (6 steps per epoch).
    stopped = _trainer(async_save, [ModelCheckpoint(folder, every_n_steps=4, every_n_epochs=None, keep_last=2),
                                    StopAt()], strategy)
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
            "blocked": stopped.run_state.sharded.last_blocked_s}


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def two_ranks(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp_ckpt")
    return folder, request.param, run_spawn(_resume, 2, str(folder), request.param)


def test_resume_on_two_ranks_is_bit_identical(two_ranks):
    folder, _, ranks = two_ranks
    for out in ranks:
        for name, value in out["straight"].items():
            assert torch.equal(out["resumed"][name], value), name
            assert torch.equal(out["from_step_8"][name], value), name
        assert out["history"][0]["train_loss"] == out["history"][1]["train_loss"]
        assert out["blocked"] >= 0
    written = sorted(p.name for p in folder.iterdir())
    assert written == ["latest", "step-000000004.ckpt", "step-000000008.ckpt", "stop.ckpt"]
    shard_files = sorted(p.name for p in (folder / "stop.ckpt").iterdir())
    assert shard_files == [".metadata", "__0_0.distcp", "__1_0.distcp", "run.ckpt"]
    assert (folder / "latest").read_text().strip() == "stop.ckpt"


def test_two_to_one_reshards_and_trains_on(two_ranks):
    folder, async_save, ranks = two_ranks
    if async_save:
        pytest.skip("one reshard is enough")
    one = _trainer(False)  # this process: one rank, no process group
    one.load_checkpoint(folder / "step-000000008.ckpt")
    assert one.global_step == 8
    loaded = {k: v.clone() for k, v in one.module.state_dict().items()}
    one.fit(_loader(), max_steps=13)  # 2 ranks' position rescaled to 1 rank: mid-epoch, then on
    assert one.global_step == 13
    assert any(not torch.equal(loaded[k], v) for k, v in one.module.state_dict().items())  # it trained on


def test_consolidate_gives_the_full_model(two_ranks, tmp_path):
    from anndist.consolidate import main
    folder, async_save, ranks = two_ranks
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
