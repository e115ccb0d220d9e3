"""Step records: every group's learning rate, the gradient norm before clipping, items/s from the one
all-reduce; eval records for step-mode evaluations; evaluation time kept out of the interval."""
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Trainer
from anndist.callbacks import metrics as metrics_module
from anndist.callbacks.logging import format_record
from support import make_dataset, make_model
from support.callbacks import Norms, Records
from anndist.dist.data_layout import DataLayout


def token_loss(model, batch):
    """A mean over 'tokens': sample i counts y_i + 1 of them, so items differ from samples."""
    x, y = batch
    per_sample = nn.functional.cross_entropy(model(x), y, reduction="none")
    tokens = y + 1
    return (per_sample * tokens).sum() / tokens.sum(), tokens.sum()


def test_step_records_carry_group_lrs_grad_norm_and_items_per_s(monkeypatch):
    reductions, real = [], metrics_module.collectives.all_reduce_async

    def counted(tensor, *group):
        if sys._getframe(1).f_globals["__name__"] == metrics_module.__name__:
            reductions.append(tensor.numel())
        return real(tensor, *group)

    monkeypatch.setattr(metrics_module.collectives, "all_reduce_async", counted)
    model = make_model()
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                                 {"params": model[2].parameters(), "lr": 0.01}])
    records, norms = Records(log_interval=2), Norms()
    data = make_dataset(32)
    trainer = Trainer(model, optimizer, compute_loss=token_loss, max_grad_norm=1e-3, callbacks=[records, norms],
                      progress_bar=False, handle_signals=False)
    trainer.fit(DataLoader(data, batch_size=8), num_epochs=1)  # 4 steps: records at 2 and 4
    steps = [r for r in records.records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [2, 4]
    assert reductions == [3, 3]  # the metrics' only collective, one per record: [loss sum, items, samples]
    for record, first in zip(steps, (0, 16)):
        assert list(record)[4:] == ["loss", "lr", "lr_group1", "grad_norm", "samples_per_s", "items_per_s"]
        assert (record["lr"], record["lr_group1"]) == (0.1, 0.01)
        assert record["grad_norm"] == norms.norms[record["step"]] > 1e-3  # the norm before clipping
        tokens = float((data.tensors[1][first:first + 16] + 1).sum())
        assert record["items_per_s"] / record["samples_per_s"] == pytest.approx(tokens / 16)
    line = format_record(steps[0])
    assert "samples/s | " in line and "items/s | grad_norm " in line


def test_plain_step_records_have_one_lr_and_nothing_unasked():
    model = make_model()
    records = Records(log_interval=2)
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), callbacks=[records],
            progress_bar=False, handle_signals=False).fit(DataLoader(make_dataset(32), batch_size=8), num_epochs=1)
    step = next(r for r in records.records if r["kind"] == "step")
    assert list(step)[4:] == ["loss", "lr", "samples_per_s"]  # one group, no clipping, samples only
    assert " items/s" not in format_record(step) and "grad_norm" not in format_record(step)


class Clock:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now

    def time(self):
        return 1.0e9 + self.now


def _stub_trainer():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    return SimpleNamespace(is_main_process=True, world_size=1, epoch=0, global_step=0, optimizer=optimizer,
                           config=SimpleNamespace(max_grad_norm=None), strategy=SimpleNamespace(data=DataLayout()))


def test_step_mode_evaluations_are_eval_records_and_not_training_time(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(metrics_module, "time", clock)
    records, trainer = Records(log_interval=2), _stub_trainer()
    records.on_train_begin(trainer)
    records.on_epoch_begin(0, trainer)
    for step in (1, 2):
        clock.now += 1.0  # one second per step of 8 samples
        trainer.global_step = step
        records.on_batch_end(step - 1, trainer, {"loss": torch.tensor(0.5), "batch_size": 8, "num_items": 8,
                                                 "ends_window": True, "stepped": True})
        if step == 1:  # an evaluation of 10 s after step 1, inside the interval
            records.on_evaluate_begin(trainer, {})
            clock.now += 10.0
            records.on_evaluate_end(trainer, {"val_loss": 0.25, "epoch": 0, "global_step": 1, "when": "step"})
    records.on_evaluate_begin(trainer, {})
    records.on_evaluate_end(trainer, {"val_loss": 0.2, "epoch": 0, "global_step": 2, "when": "epoch"})
    records.on_train_end(trainer)
    kinds = [(r["kind"], r["step"]) for r in records.records]
    assert kinds == [("start", 0), ("eval", 1), ("step", 2)]  # an epoch-end evaluation waits for the epoch record
    evaluation, step = records.records[1], records.records[2]
    assert {k: v for k, v in evaluation.items() if k not in ("time",)} == {
        "kind": "eval", "epoch": 0, "step": 1, "val_loss": 0.25}
    assert step["samples_per_s"] == pytest.approx(16 / 2.0)  # 2 s of training, the 10 s evaluation left out


def test_step_mode_fit_writes_eval_records_at_the_global_step():
    model = make_model()
    records = Records(log_interval=2)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), callbacks=[records],
                      progress_bar=False, handle_signals=False)
    trainer.fit(DataLoader(make_dataset(40), batch_size=8), num_epochs=2,
                val_loader=DataLoader(make_dataset(16, seed=1), batch_size=8), eval_every_n_steps=3)
    evals = [r for r in records.records if r["kind"] == "eval"]
    assert [(r["epoch"], r["step"]) for r in evals] == [(0, 3), (1, 6), (1, 9)]  # across the epoch boundary
    assert all("val_loss" in r and "when" not in r and "global_step" not in r for r in evals)
    epochs = [r for r in records.records if r["kind"] == "epoch"]
    assert all("val_loss" not in r for r in epochs)  # step mode: no validation at epoch end
