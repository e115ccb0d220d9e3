"""PreemptionCallback on 2 real ranks: a signal on one rank stops every rank at the same step."""
from __future__ import annotations

import signal

import torch
from torch.utils.data import DataLoader

from anndist import PreemptionCallback, Trainer
from support import make_dataset, make_model, run_spawn
from support.callbacks import SignalAt


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
