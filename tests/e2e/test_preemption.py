"""PreemptionCallback in real processes that signal themselves: exit as if killed without a checkpoint_dir,
save and exit 75 then resume exactly, a repeated SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch

from anndist import PREEMPTED_EXIT_CODE, latest_checkpoint
from support import ROOT, child_env

SIGNAL_SELF = """
import os, signal, sys, torch
from torch.utils.data import DataLoader
sys.path.insert(0, "tests")
from anndist import Callback, Trainer
from support import flat_params, make_dataset, make_model
sig, at_step, checkpoint_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None, sys.argv[4]
async_checkpoint = sys.argv[5:] == ["async"]
class Kill(Callback):
    def on_batch_end(self, batch_idx, trainer, logs=None):
        if trainer.global_step == at_step:
            os.kill(os.getpid(), getattr(signal, sig))
model = make_model(dropout=0.2)
trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.01), torch.nn.CrossEntropyLoss(), callbacks=[Kill()],
                  seed=0, checkpoint_dir=checkpoint_dir, auto_resume=checkpoint_dir is not None,
                  async_checkpoint=async_checkpoint)
trainer.fit(DataLoader(make_dataset(), batch_size=8, shuffle=True), num_epochs=3)
torch.save(flat_params(trainer.module), out)
print("fit returned")
"""


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.sys.executable, "-c", SIGNAL_SELF, *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)


def test_without_checkpoint_dir_the_process_exits_as_if_killed(tmp_path):
    proc = _python("SIGTERM", "3", "", str(tmp_path / "w.pt"))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "fit returned" not in proc.stdout
    assert "SIGTERM received: every rank stopped after optimizer step 3" in proc.stderr
    assert "no checkpoint_dir: nothing saved" in proc.stderr


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_signal_saves_exits_75_and_the_rerun_resumes_exactly(tmp_path, mode):
    """Outside SLURM: USR1 mid-epoch saves and exits 75 (nothing to requeue); running the same
    command again resumes from the checkpoint and ends with the uninterrupted run's weights. With
    async_checkpoint=True the save is committed before the callback goes on (requeue, exit)."""
    ckpt, weights = tmp_path / "ckpt", tmp_path / "resumed.pt"
    first = _python("SIGUSR1", "5", str(ckpt), str(weights), mode)  # 8 steps per epoch: mid-epoch
    assert first.returncode == PREEMPTED_EXIT_CODE == 75, first.stderr
    assert "fit returned" not in first.stdout and "not a SLURM job: nothing to requeue" in first.stderr
    assert latest_checkpoint(ckpt) is not None
    if mode == "async":
        assert (latest_checkpoint(ckpt) / ".metadata").is_file()
        assert first.stderr.index("committed") < first.stderr.index(f"saved {ckpt}"), first.stderr
    second = _python("SIGUSR1", "-1", str(ckpt), str(weights), mode)
    assert second.returncode == 0 and "resumed from" in second.stderr, second.stderr
    reference = _python("SIGUSR1", "-1", "", str(tmp_path / "reference.pt"))
    assert reference.returncode == 0, reference.stderr
    assert torch.equal(torch.load(weights), torch.load(tmp_path / "reference.pt"))


REPEATED_TERM = """
import os, signal, sys, time, torch
from torch.utils.data import DataLoader
sys.path.insert(0, "tests")
from anndist import Callback, Trainer
from support import make_dataset, make_model
pause = float(sys.argv[1])
class TermTwice(Callback):
    def on_batch_end(self, batch_idx, trainer, logs=None):
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(pause)  # 0: a launcher's duplicate; more than 5 s: a rank that does not come back
            os.kill(os.getpid(), signal.SIGTERM)
model = make_model()
trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), callbacks=[TermTwice()])
trainer.fit(DataLoader(make_dataset(), batch_size=8), num_epochs=1)
"""


@pytest.mark.parametrize("pause, returncode", [(0.0, 128 + signal.SIGTERM), (5.5, -signal.SIGTERM)])
def test_a_repeated_sigterm_only_takes_the_default_action_when_it_comes_late(pause, returncode):
    """Slurm and torchrun often deliver one TERM twice at once: that still stops cleanly (exit 143, as
    if killed, since there is no checkpoint_dir). A TERM 5 s after the first ends the process at once."""
    proc = subprocess.run([os.sys.executable, "-c", REPEATED_TERM, str(pause)], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == returncode, proc.stderr
