"""PreemptionCallback without Slurm, in one process: real signals, handlers restored, its options. On
real ranks: tests/multiprocess/test_preemption.py; in processes that exit: tests/e2e/test_preemption.py;
the Slurm paths: tests/e2e/test_slurm.py."""
from __future__ import annotations

import os
import signal

import pytest
import torch
from torch.utils.data import DataLoader

from anndist import Callback, PreemptionCallback, Trainer
from anndist.dist.slurm import RequeueError, requeue
from support import ROOT, make_dataset, make_model
from support.callbacks import SignalAt

BATCHES_PER_EPOCH = 8  # 64 samples / batch 8 on one rank; 4 per rank on two


def _trainer(callbacks, **options):
    model = make_model()
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                   callbacks=callbacks, seed=0, **options)


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


def test_requeue_without_scontrol_says_so(monkeypatch):
    monkeypatch.setenv("PATH", str(ROOT / "slurm"))  # a folder without scontrol
    with pytest.raises(RequeueError, match=r"`scontrol` is not on PATH .*containers.*resubmit"):
        requeue("42")
