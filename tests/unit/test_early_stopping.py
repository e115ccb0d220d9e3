"""EarlyStopping in one process: patience on a scripted metric, across a requeue, best weights (2 ranks:
tests/multiprocess/test_early_stopping.py)."""
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from anndist import Callback, CallbackError, EarlyStopping
from support import flat_params, make_dataset
from support.early_stopping import SCORES, STEPS_PER_EPOCH, scripted_trainer


class Weights(Callback):
    """The weights at each epoch end."""

    def __init__(self):
        self.seen = []

    def on_epoch_end(self, epoch, trainer, logs=None):
        self.seen.append(flat_params(trainer.module))


class StopAt(Callback):
    """Another callback's stop (as a preemption's) at the end of ``epoch``."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, epoch, trainer, logs=None):
        if epoch == self.epoch:
            trainer.stop_training = True


def _loaders(n=16):
    return DataLoader(make_dataset(n), batch_size=8, shuffle=True), DataLoader(make_dataset(8, seed=1), batch_size=8)


def test_stops_exactly_after_patience_evaluations_without_improvement():
    early = EarlyStopping("val_score", patience=3)
    trainer = scripted_trainer(early)
    history = trainer.fit(*_loaders()[:1], num_epochs=20, val_loader=_loaders()[1])
    assert history["val_score"] == SCORES[:6]  # 3.5, 3.2, 3.1 do not beat 3.0: stop after the sixth
    assert (early.best, early.best_epoch, early.best_step) == (3.0, 2, 3 * STEPS_PER_EPOCH)
    assert early.wait == 3 and early.stopped_step == trainer.global_step == 6 * STEPS_PER_EPOCH


def test_min_delta_and_max_mode():
    early = EarlyStopping("val_score", patience=2, min_delta=0.6)
    assert early.improves(5.0)  # the first finite value is the first best
    early.reference = 5.0  # the last improvement by more than min_delta
    assert early.improves(4.3) and not early.improves(4.5) and not early.improves(float("nan"))
    up = EarlyStopping("val_accuracy", mode="max")
    up.reference = 0.5
    assert up.improves(0.6) and not up.improves(0.4) and not up.improves(float("inf"))


def _interrupted_then_resumed(tmp_path):
    """fit 4 epochs, checkpoint, then a new process's objects load it and continue (a requeue)."""
    train, val = _loaders()
    first = scripted_trainer(EarlyStopping("val_score", patience=3))
    first.fit(train, num_epochs=4, val_loader=val)
    assert first.callbacks.callbacks[0].wait == 1  # 3.5 after the best 3.0
    path = first.save_checkpoint(tmp_path / "run.ckpt")
    early = EarlyStopping("val_score", patience=3)
    second = scripted_trainer(early, start=4, seed=1)  # other initial weights: the checkpoint must set them
    second.load_checkpoint(path)
    second.fit(train, num_epochs=20, val_loader=val)
    return second, early


def test_patience_carries_across_a_requeue(tmp_path):
    train, val = _loaders()
    uninterrupted = scripted_trainer(EarlyStopping("val_score", patience=3))
    uninterrupted.fit(train, num_epochs=20, val_loader=val)
    resumed, early = _interrupted_then_resumed(tmp_path)
    assert early.stopped_step == resumed.global_step == uninterrupted.global_step == 6 * STEPS_PER_EPOCH
    assert (early.best, early.best_step, early.wait) == (3.0, 3 * STEPS_PER_EPOCH, 3)
    assert resumed.history["val_score"] == uninterrupted.history["val_score"] == SCORES[:6]
    torch.testing.assert_close(flat_params(resumed.module), flat_params(uninterrupted.module), rtol=0, atol=0)


def test_a_fit_resumed_after_the_stop_stops_at_once(tmp_path):
    train, val = _loaders()
    first = scripted_trainer(EarlyStopping("val_score", patience=3))
    first.fit(train, num_epochs=20, val_loader=val)
    path = first.save_checkpoint(tmp_path / "stopped.ckpt")
    early = EarlyStopping("val_score", patience=3)
    again = scripted_trainer(early, start=6)
    again.load_checkpoint(path)
    again.fit(train, num_epochs=20, val_loader=val)
    assert again.global_step == first.global_step and len(again.history["val_score"]) == 6


def test_restore_best_weights_at_the_end_and_only_in_the_state_when_asked():
    weights, early = Weights(), EarlyStopping("val_score", patience=3, restore_best_weights=True)
    trainer = scripted_trainer(early, extra=[weights])
    trainer.fit(_loaders()[0], num_epochs=20, val_loader=_loaders()[1])
    assert torch.equal(flat_params(trainer.module), weights.seen[2])  # the best evaluation's weights
    assert not torch.equal(weights.seen[2], weights.seen[-1])
    state = early.state_dict()
    assert state["best_weights"].keys() == trainer.module.state_dict().keys()
    assert all(t.device.type == "cpu" for t in state["best_weights"].values())
    assert "best_weights" not in EarlyStopping("val_score").state_dict()


def test_another_callbacks_stop_keeps_the_latest_weights():
    weights, early = Weights(), EarlyStopping("val_score", patience=3, restore_best_weights=True)
    trainer = scripted_trainer(early, extra=[weights, StopAt(epoch=4)])  # before the patience runs out
    trainer.fit(_loaders()[0], num_epochs=20, val_loader=_loaders()[1])
    assert early.stopped_step is None and early.wait == 2
    assert torch.equal(flat_params(trainer.module), weights.seen[-1])


def test_hooks_in_step_mode_and_outside_fit():
    """Step mode counts on_evaluate_end with when == "step"; epoch ends and evaluate() are not counted."""
    early = EarlyStopping("val_loss", patience=2)
    trainer = SimpleNamespace(eval_every_n_steps=5, global_step=0, epoch=0, stop_training=False, module=None)
    for step, loss in ((5, 1.0), (10, 1.5), (15, 0.9), (20, 0.95)):
        trainer.global_step = step
        early.on_evaluate_end(trainer, {"val_loss": loss, "epoch": 0, "global_step": step, "when": "step"})
        early.on_evaluate_end(trainer, {"val_loss": 9.0, "when": "evaluate"})  # evaluate() outside fit
        early.on_epoch_end(0, trainer, {"train_loss": 0.1, "val_loss": 9.0})  # no val at epoch end in step mode
    assert (early.best, early.best_step, early.wait, trainer.stop_training) == (0.9, 15, 1, False)
    trainer.global_step = 25
    early.on_evaluate_end(trainer, {"val_loss": 0.91, "epoch": 1, "global_step": 25, "when": "step"})
    assert trainer.stop_training and early.stopped_step == 25
    epoch_mode = EarlyStopping("val_loss", patience=1)
    trainer = SimpleNamespace(eval_every_n_steps=None, global_step=3, epoch=0, stop_training=False, module=None)
    epoch_mode.on_evaluate_end(trainer, {"val_loss": 1.0, "epoch": 0, "global_step": 3, "when": "epoch"})
    assert epoch_mode.best is None  # epoch mode judges at on_epoch_end
    epoch_mode.on_epoch_end(0, trainer, {"train_loss": 2.0, "val_loss": 1.0})
    assert epoch_mode.best == 1.0


def test_step_mode_fit_stops_at_the_evaluation_that_spends_the_patience():
    early = EarlyStopping("val_score", patience=3)
    trainer = scripted_trainer(early)
    trainer.fit(_loaders()[0], num_epochs=50, val_loader=_loaders()[1], eval_every_n_steps=3)
    assert early.stopped_step == trainer.global_step == 6 * 3  # the sixth evaluation, after step 18
    assert (early.best, early.best_step) == (3.0, 9)


def test_a_missing_metric_is_named():
    trainer = scripted_trainer(EarlyStopping("val_f1"))
    with pytest.raises(CallbackError, match=r"on_train_begin .*monitor='val_f1'\) is not a metric of an epoch: "
                                            r"they are .*'val_score'"):
        trainer.fit(_loaders()[0], num_epochs=2, val_loader=_loaders()[1])
    assert trainer.global_step == 0  # found at the start, not after an epoch of training


@pytest.mark.parametrize("kwargs, error, match", [
    ({"monitor": 3}, TypeError, "monitor must be a metric name"),
    ({"patience": 0}, ValueError, r"patience=0 must be >= 1"),
    ({"patience": 2.5}, TypeError, "patience must be an int"),
    ({"mode": "lowest"}, ValueError, r"mode='lowest' is not one of \['min', 'max'\]"),
    ({"min_delta": -0.1}, ValueError, r"min_delta=-0.1 must be a finite number >= 0"),
    ({"restore_best_weights": 1}, TypeError, "restore_best_weights must be True or False"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        EarlyStopping(**kwargs)
