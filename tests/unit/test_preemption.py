"""PreemptionCallback without Slurm: real signals, real ranks; the Slurm paths are in test_slurm.py."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch
from torch.utils.data import DataLoader

from anndist import PREEMPTED_EXIT_CODE, Callback, PreemptionCallback, Trainer, latest_checkpoint
from anndist.dist.slurm import RequeueError, requeue
from support import ROOT, child_env, make_dataset, make_model, run_spawn
from support.callbacks import SignalAt

BATCHES_PER_EPOCH = 8  # 64 samples / batch 8 on one rank; 4 per rank on two


def _trainer(callbacks, **options):
    model = make_model()
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                   callbacks=callbacks, seed=0, **options)


def _fit_with_signals(rank, world_size):
    results = []
    for sig, period in ((signal.SIGUSR1, 0.0), (signal.SIGTERM, 0.0), (signal.SIGUSR1, 0.05)):
        trainer = _trainer([SignalAt(sig, step=3, rank=1), PreemptionCallback(exit=False)], stop_check_period=period)
        before = signal.getsignal(sig)
        trainer.fit(DataLoader(make_dataset(256), batch_size=8, shuffle=True), num_epochs=3)
        results.append({"step": trainer.global_step, "epoch": trainer.epoch, "stopped": trainer.stop_training,
                        "handler_restored": signal.getsignal(sig) == before,
                        "interval": trainer._agreement._interval})
    return results


def test_signal_on_one_rank_stops_every_rank_at_the_same_step():
    usr1, term, spaced = zip(*run_spawn(_fit_with_signals, 2))
    for results in (usr1, term):
        # Rank 1 is signalled after step 3; the agreement is read one step later: both stop after step 4.
        assert [r["step"] for r in results] == [4, 4]
        assert all(r["stopped"] and r["epoch"] == 0 and r["handler_restored"] for r in results)
    # With stop_check_period the all-reduce runs every few steps only: later, but still the same step.
    assert spaced[0]["step"] == spaced[1]["step"] >= 4 and all(r["stopped"] for r in spaced)
    assert spaced[0]["interval"] == spaced[1]["interval"] > 1, spaced


def test_signal_after_the_last_epoch_changes_nothing():
    # Signalled once the last epoch's batches are done: training is complete, nothing to save or requeue.
    trainer = _trainer([SignalAt(signal.SIGUSR1, epoch_end=1), PreemptionCallback()])  # exit=True
    trainer.fit(DataLoader(make_dataset(), batch_size=8), num_epochs=2)  # does not raise SystemExit
    assert trainer.global_step == 2 * BATCHES_PER_EPOCH and trainer.epoch == 2 and trainer.stop_training


class Boom(Callback):
    def on_batch_end(self, batch_idx, trainer, logs=None):
        raise RuntimeError("boom")


def test_after_a_failed_fit_a_signal_gets_its_previous_handler():
    got = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    try:
        trainer = _trainer([Boom()])
        with pytest.raises(Exception, match="boom"):
            trainer.fit(DataLoader(make_dataset(), batch_size=8), num_epochs=1)
        os.kill(os.getpid(), signal.SIGUSR1)  # anndist's handler, left by the failed fit, hands it on
        assert got == [signal.SIGUSR1] and not trainer.stop_training
        os.kill(os.getpid(), signal.SIGUSR1)  # and is gone
        assert got == [signal.SIGUSR1] * 2
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_trainer_installs_one_by_default_and_not_when_asked():
    assert sum(isinstance(cb, PreemptionCallback) for cb in _trainer([]).callbacks) == 1
    own = PreemptionCallback(requeue_signals=())
    assert [cb for cb in _trainer([own]).callbacks if isinstance(cb, PreemptionCallback)] == [own]
    assert not any(isinstance(cb, PreemptionCallback) for cb in _trainer([], handle_signals=False).callbacks)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"handle_signals": "yes"}, TypeError, "handle_signals must be True or False"),
    ({"stop_check_period": -1}, ValueError, "stop_check_period=-1 must be a number of seconds >= 0"),
    ({"stop_check_period": "1s"}, ValueError, "stop_check_period='1s' must be a number"),
])
def test_bad_option(kwargs, error, message):
    with pytest.raises(error, match=message):
        _trainer([], **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"signals": ["USR1"]}, "signals=.*must be signal numbers"),
    ({"signals": [signal.SIGTERM], "requeue_signals": [signal.SIGUSR1]}, "requeue_signals=SIGUSR1 must be among"),
])
def test_bad_callback_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreemptionCallback(**kwargs)


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


def test_requeue_without_scontrol_says_so(monkeypatch):
    monkeypatch.setenv("PATH", str(ROOT / "slurm"))  # a folder without scontrol
    with pytest.raises(RequeueError, match=r"`scontrol` is not on PATH .*containers.*resubmit"):
        requeue("42")


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
