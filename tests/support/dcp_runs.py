"""Runs that save DCP checkpoint folders (FSDP's, and DDP's asynchronous saves), shared by the FSDP and
DDP checkpoint tests: the model, Trainer and loader of those runs, a stop and resume on the ranks, and
kill -9 of a torchrun job in the middle of asynchronous saves."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Trainer
from anndist.callbacks import Callback, ModelCheckpoint

from .models import full_weights, make_dataset


def dcp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))


def dcp_trainer(async_save: bool, callbacks=(), strategy: str = "fsdp", **options) -> Trainer:
    model = dcp_model()
    sharding = {"shard_modules": lambda m: isinstance(m, nn.Linear)} if strategy == "fsdp" else {}
    return Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), nn.CrossEntropyLoss(), strategy=strategy,
                   **sharding, async_checkpoint=async_save, seed=0,
                   progress_bar=False, handle_signals=False, callbacks=list(callbacks),
                   scheduler=None, gradient_accumulation_steps=2,
                   stop_check_period=0,  # the stop lands at a known step (10), not up to 0.25 s of steps later
                   **options)


def dcp_loader() -> DataLoader:
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


def stop_and_resume(rank: int, world_size: int, folder: str, async_save: bool, strategy: str = "fsdp") -> dict:
    straight = dcp_trainer(async_save, strategy=strategy)
    straight.fit(dcp_loader(), max_steps=14)
    # Saved every 4 steps by ModelCheckpoint (2 kept); stopped at step 10 on 2 ranks (the flag set after
    # step 9 is read one proposal later), mid-epoch (6 steps per epoch).
    at_8 = WeightsAt(8)
    stopped = dcp_trainer(async_save, [ModelCheckpoint(folder, every_n_steps=4, every_n_epochs=None, keep_last=2),
                                       StopAt(), at_8], strategy)
    stopped.fit(dcp_loader(), max_steps=14)
    assert stopped.global_step == 10 and stopped.batch_in_epoch == 8
    stopped.save_in_dir(folder, "stop")
    stopped.close()
    resumed = dcp_trainer(async_save, strategy=strategy)
    resumed.fit(dcp_loader(), max_steps=14, resume_from=f"{folder}/stop.ckpt")
    # Step 8 was saved while training went on (an asynchronous save's staging must have copied the state).
    from_step_8 = dcp_trainer(async_save, strategy=strategy)
    from_step_8.fit(dcp_loader(), max_steps=14, resume_from=f"{folder}/step-000000008.ckpt")
    return {"straight": full_weights(straight.module), "resumed": full_weights(resumed.module),
            "from_step_8": full_weights(from_step_8.module), "history": (straight.history, resumed.history),
            "blocked": stopped.run_state.sharded.last_blocked_s, "at_8": at_8.weights}


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
    from .processes import ROOT, child_env
    from .scripts.async_saves import model

    folder, previous = tmp_path / "ckpt", -1
    for trial in range(3):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "support" / "scripts" / "async_saves.py"), str(folder), strategy]
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
