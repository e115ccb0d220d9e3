"""The loss-spike guard in one process: the detector (warm-up, threshold, state), a spike skipped before the
optimizer sees it (weights, optimizer, scheduler and step count unchanged; recorded in the run's state and
in the metrics), a rollback to the newest older step checkpoint after spikes in a row, bit-identical
resumes around both, and the errors. The same on 2 ranks: tests/multiprocess/test_spike_guard.py."""
from __future__ import annotations

import math

import pytest
import torch

from anndist import ModelCheckpoint, SpikeGuard, Trainer
from anndist.step.train_step import TrainStep
from support import flat_params
from support.callbacks import Records
from support.spikes import Spiker, spike_loader, spike_run

SPIKE = (0, 9, 0)  # epoch 0, micro-batch 9, rank 0: the window of optimizer step 10 (16 steps per epoch)


def test_options_are_checked():
    with pytest.raises(TypeError, match="spike_guard must be True, False or a SpikeGuard"):
        spike_run(Spiker(), "yes")
    for bad, match in (({"watch": "lr"}, "watch='lr'"), ({"threshold": 0}, "threshold=0"), ({"decay": 1.0}, "decay=1.0"),
                       ({"warmup": -1}, "warmup=-1"), ({"max_consecutive": 0}, "max_consecutive=0")):
        with pytest.raises(ValueError, match=match):
            SpikeGuard(**bad)


def test_the_detector_waits_for_its_warm_up_and_keeps_its_state():
    guard = SpikeGuard(warmup=3, threshold=3.0, decay=0.9)
    where = {"epoch": 0, "step": 1, "window": 0, "first_batch": 0, "last_batch": 0}
    assert [guard.observe(v, where) for v in (1.0, 5.0, 0.9)] == [False] * 3  # warm-up: observed only
    assert guard.limit() < 5.0 and not guard.observe(1.0, where)
    state = guard.state_dict()
    assert guard.observe(50.0, where) and guard.streak == 1 and guard.state_dict()["mean"] == state["mean"]
    assert guard.events[-1]["action"] == "skip" and guard.events[-1]["value"] == 50.0
    copy = SpikeGuard(warmup=3, threshold=3.0, decay=0.9)
    copy.load_state_dict(guard.state_dict())
    assert copy.limit() == guard.limit() and copy.events == guard.events
    assert not guard.observe(math.nan, where)  # non-finite: on_nonfinite's, never the guard's


def test_off_by_default_and_then_nothing_on_the_step_path():
    trainer = spike_run(Spiker(), False)
    assert trainer.state.spike_guard is None and "spike_guard" not in trainer.state.state_dict()
    assert type(trainer._step).__dict__["finish_window"] is TrainStep.finish_window
    assert "finish_window" not in vars(trainer._step) and "_finite_step" not in vars(trainer._optimizer_step)


@pytest.mark.parametrize("watch", ["loss", "grad_norm"])
def test_a_spike_is_skipped_before_the_optimizer_sees_it(watch):
    spiker, records = Spiker([SPIKE]), Records(log_interval=4)
    trainer = spike_run(spiker, SpikeGuard(watch=watch, warmup=5, threshold=10), [records])
    history = trainer.fit(spike_loader(), num_epochs=2)
    spiked = [w for w in spiker.windows if w[:2] == SPIKE[:2]][0]
    before = spiker.windows[spiker.windows.index(spiked) - 1]
    assert (before[2], spiked[2], spiked[3]) == (9, 9, False)  # no step taken, global_step stays
    assert torch.equal(spiked[4], before[4])  # the weights did not move
    assert trainer.global_step == 31 and trainer.scheduler.last_epoch == 31  # 32 windows, one skipped
    assert [{k: e[k] for k in ("action", "step", "epoch", "first_batch", "last_batch")}
            for e in trainer.state.spike_guard.events] == [
        {"action": "skip", "step": 10, "epoch": 0, "first_batch": 9, "last_batch": 9}]
    assert math.isfinite(history["train_loss"][0]) and history["train_loss"][0] < 2  # the spike is not in it
    spikes = [r for r in records.records if r["kind"] == "spike"]
    assert [(r["action"], r["skipped_step"], r["first_batch"]) for r in spikes] == [("skip", 10, 9)]
    assert spikes[0]["value"] > spikes[0]["limit"]


def test_without_the_guard_the_spike_is_trained():
    spiker = Spiker([SPIKE])
    spike_run(spiker, False).fit(spike_loader(), num_epochs=1)
    spiked = [w for w in spiker.windows if w[:2] == SPIKE[:2]][0]
    assert spiked[2:4] == (10, True)  # the comparison above has teeth: this spike moves the weights


def test_resumed_around_a_spike_bit_identical(tmp_path):
    def run(resume_from=None):
        spiker = Spiker([SPIKE])
        trainer = spike_run(spiker, SpikeGuard(warmup=5), [ModelCheckpoint(tmp_path, every_n_steps=4, keep_last=None)])
        trainer.fit(spike_loader(), num_epochs=2, resume_from=resume_from)
        return flat_params(trainer.module), trainer.state.spike_guard.state_dict(), trainer.history

    straight = run()
    for step in (8, 12):  # before the spike, and after it (the guard's state then comes from the checkpoint)
        resumed = run(tmp_path / f"step-{step:09d}.ckpt")
        assert torch.equal(resumed[0], straight[0]) and resumed[1:] == straight[1:]


def test_spikes_in_a_row_roll_back_to_the_newest_older_checkpoint(tmp_path):
    def run(resume_from=None):
        spiker = Spiker([(0, 8, 0), (0, 9, 0)])  # right after the checkpoint of step 8: the one before is step 4
        trainer = spike_run(spiker, SpikeGuard(watch="loss", warmup=5, max_consecutive=2),
                            [ModelCheckpoint(tmp_path, every_n_steps=4, keep_last=None)])
        trainer.fit(spike_loader(), num_epochs=2, resume_from=resume_from)
        return trainer, spiker

    trainer, spiker = run()
    rolled = [w for w in spiker.windows if w[:2] == (0, 9)][0]
    saved = torch.load(tmp_path / "rolled_back" / "step-000000008.ckpt", weights_only=True)["states"]
    assert saved["train_state"]["batch_in_epoch"] == 8  # the abandoned step 8, set aside
    saved = torch.load(tmp_path / "step-000000004.ckpt", weights_only=True)["states"]["model"]
    assert rolled[2:4] == (4, False)  # global_step back to the checkpoint's
    assert torch.equal(rolled[4], torch.cat([t.reshape(-1) for t in saved.values()]))
    events = trainer.state.spike_guard.events
    assert [(e["action"], e["step"], e["first_batch"]) for e in events] == [("skip", 9, 8), ("skip", 9, 9),
                                                                           ("rollback", 9, 9)]
    assert (events[2]["to_step"], events[2]["from_batch"], events[2]["checkpoint"]) == (4, 4, "step-000000004.ckpt")
    # the data went on after the spikes: micro-batches 4-7 and 8-9 of epoch 0 are skipped, 10-15 trained
    assert trainer.global_step == 4 + 6 + 16 and trainer.scheduler.last_epoch == trainer.global_step
    resaved = torch.load(tmp_path / "step-000000008.ckpt", weights_only=True)["states"]["train_state"]
    assert resaved["batch_in_epoch"] == 14  # step 8 of the rolled-back run: saved again (ModelCheckpoint rolled back)
    target = torch.load(tmp_path / "step-000000004.ckpt", weights_only=True)["states"]["train_state"]
    assert target["batch_in_epoch"] == 4  # ... and step 4 not again, as if it were new
    assert (tmp_path / "latest").read_text() == "step-000000026.ckpt\n"  # the epoch end's save
    resumed, _ = run(tmp_path / "step-000000004.ckpt")
    assert torch.equal(flat_params(resumed.module), flat_params(trainer.module))
    assert resumed.state.spike_guard.events == events


def test_spikes_in_a_row_without_a_checkpoint_to_roll_back_to_raise():
    trainer = spike_run(Spiker([SPIKE, (0, 10, 0)]), SpikeGuard(watch="loss", warmup=5, max_consecutive=2))
    with pytest.raises(RuntimeError, match="2 loss spikes in a row up to optimizer step 10 .* no step checkpoint older"):
        trainer.fit(spike_loader(), num_epochs=1)
