"""A SIGTERM to a rank's whole process group, DataLoader workers included (issue 26, case 2).

Slurm's proctrack/cgroup sends its time-limit, scancel and preemption TERM to every process of the
step. The rank must still stop, save and exit 75 (its workers outliving the TERM), and its workers
must still be stopped when the rank exits, without a hang: torch and multiprocessing stop workers
with a TERM of their own. Both for workers that live one epoch and for persistent ones.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from anndist import PREEMPTED_EXIT_CODE, latest_checkpoint
from anndist.checkpoint.file import read_checkpoint
from support import ROOT, child_env

SCRIPT = ROOT / "tests" / "support" / "scripts" / "term_workers.py"
LIMIT_S = 120  # one launch; a rank that hangs at exit runs into it


def _launch(tmp_path, persistent, epochs, term_after_step=None):
    """Run the script in a session of its own (its process group is what Slurm signals); with
    ``term_after_step``, TERM the whole group once the rank printed that step."""
    cmd = [sys.executable, str(SCRIPT), "--persistent", str(persistent), "--checkpoint-dir", str(tmp_path / "ckpt"),
           "--epochs", str(epochs), "--out", str(tmp_path / "weights.pt")]
    with subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        lines, workers = [], []
        try:
            if term_after_step is not None:
                for line in proc.stdout:
                    lines.append(line)
                    if line.startswith(f"step {term_after_step} "):
                        workers = [int(pid) for pid in line.split("workers")[1].split()]
                        os.killpg(proc.pid, signal.SIGTERM)  # the rank and its workers, as proctrack does
                        break
            stdout, stderr = proc.communicate(timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise AssertionError(f"still running after {LIMIT_S} s (a hang at exit?):\n{stderr[-3000:]}") from None
    return proc.returncode, "".join(lines) + stdout, stderr, workers


@pytest.mark.parametrize("persistent", [0, 1], ids=["workers-per-epoch", "persistent-workers"])
def test_a_term_to_the_process_group_saves_exits_75_and_the_rerun_resumes(tmp_path, persistent):
    code, stdout, stderr, workers = _launch(tmp_path, persistent, epochs=200, term_after_step=3)
    assert code == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert len(workers) == 2, stdout  # the TERM reached two live workers
    assert "killed by signal" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    stopped = int(stderr.split("SIGTERM received: every rank stopped after optimizer step ")[1].split()[0])
    saved = latest_checkpoint(tmp_path / "ckpt")
    assert read_checkpoint(saved)["states"]["train_state"]["global_step"] == stopped >= 3
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]  # stopped when the rank exited
    # The requeued run: resumes there and ends normally, its workers stopped at exit within the limit.
    code, stdout, stderr, _ = _launch(tmp_path, persistent, epochs=1)
    assert code == 0, stderr[-3000:]
    assert f"resumed from {saved}" in stderr and "fit returned at step 32" in stdout
    assert torch.load(tmp_path / "weights.pt")["step"] == 32


LATE_DUPLICATE = """
import os, signal, sys, time, torch
from torch.utils.data import DataLoader
sys.path.insert(0, "tests")
from anndist import Callback, Trainer
from anndist.callbacks.preemption import REPEAT_AFTER_S
from support import make_dataset, make_model
class Term(Callback):
    def on_batch_end(self, batch_idx, trainer, logs=None):
        if trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # Slurm's TERM
class SlowSave(Callback):
    # Its state is collected by the save: the save takes longer than REPEAT_AFTER_S, as on a loaded
    # machine, and the launcher's copy of the same TERM arrives in the middle of it.
    def state_dict(self):
        if trainer.stop_training:
            time.sleep(REPEAT_AFTER_S + 0.5)
            os.kill(os.getpid(), signal.SIGTERM)
        return {}
model = make_model()
trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                  callbacks=[Term(), SlowSave()], checkpoint_dir=sys.argv[1], progress_bar=False)
trainer.fit(DataLoader(make_dataset(), batch_size=8), num_epochs=3)
"""


def test_a_late_duplicate_term_during_the_preemption_save_does_not_kill_the_rank(tmp_path):
    """On a loaded machine the copies of one TERM (Slurm's, the batch shell's, the launcher's) can arrive
    more than REPEAT_AFTER_S apart; one that comes while the rank saves must not kill it mid-save (a
    real-Slurm run once ended with exit -15 there)."""
    proc = subprocess.run([sys.executable, "-c", LATE_DUPLICATE, str(tmp_path / "ckpt")], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=LIMIT_S)
    assert proc.returncode == PREEMPTED_EXIT_CODE, (proc.returncode, proc.stderr[-3000:])
    saved = latest_checkpoint(tmp_path / "ckpt")
    assert read_checkpoint(saved)["metadata"] == {"reason": "preempted", "signal": "SIGTERM"}
