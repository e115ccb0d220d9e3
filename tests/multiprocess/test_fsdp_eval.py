"""evaluate() and predict() under strategy="fsdp" when the ranks get different numbers of eval batches.

Every forward of a sharded model all-gathers its parameters, so a rank with fewer batches used to leave
the others waiting forever. On 2 ranks, 37 samples in batches of 9 (rank 0: 19 samples, 3 batches;
rank 1: 18 samples, 2 batches): the results equal one process's on the whole set, every sample counts
once, and every run finishes (the spawn has a time limit: a hang fails instead of blocking the suite).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Trainer
from support import make_dataset, make_model, run_spawn

EVAL = make_dataset(37, seed=2)


class SampleCount:
    """A metric (not torchmetrics: anndist gathers its inputs) that counts the predictions it is given."""

    def reset(self):
        self.count = 0

    def update(self, preds, targets):
        self.count += preds.shape[0]

    def compute(self):
        return self.count


def _trainer(**options) -> Trainer:
    model = make_model(seed=11)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), progress_bar=False,
                   handle_signals=False, metrics={"seen": SampleCount()}, seed=0, **options)


def _fsdp_trainer() -> Trainer:
    return _trainer(strategy="fsdp", shard_modules=lambda m: isinstance(m, nn.Linear))


def _slices(*bounds: tuple[int, int]) -> list:
    return [(EVAL.tensors[0][a:b], EVAL.tensors[1][a:b]) for a, b in bounds]


def _uneven(rank: int, world_size: int) -> dict:
    trainer, out = _fsdp_trainer(), {}
    loader = DataLoader(EVAL, batch_size=9)  # anndist shards it: 3 batches on rank 0, 2 on rank 1
    out["evaluate"] = trainer.evaluate(loader)
    out["predict"] = trainer.predict(loader)
    # Loaders of unknown length (here lists, as any iterable): the ranks agree batch by batch.
    mine = _slices((0, 10), (10, 20), (20, 30)) if rank == 0 else _slices((30, 37))
    out["evaluate_iterable"] = trainer.evaluate(mine)
    out["predict_iterable"] = trainer.predict(mine)
    one = DataLoader(make_dataset(1, seed=2), batch_size=4)  # rank 1 gets no batch at all
    out["evaluate_one"], out["predict_one"] = trainer.evaluate(one), trainer.predict(one)
    try:
        trainer.evaluate(_slices((0, 37)) if rank == 0 else [])
    except ValueError as exc:
        out["empty_error"] = str(exc)
    fitted = _fsdp_trainer()
    fitted.fit(DataLoader(make_dataset(32), batch_size=4), num_epochs=2, val_loader=loader)
    out["history"] = fitted.history
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_spawn(_uneven, 2, timeout=240)


def _close(result: dict, reference: dict) -> None:
    assert result.keys() == reference.keys() == {"val_loss", "val_accuracy", "val_seen"}
    assert result["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-6)
    assert result["val_accuracy"] == reference["val_accuracy"]  # exact: counts
    assert result["val_seen"] == reference["val_seen"]


def test_evaluate_equals_one_process_on_the_whole_set(ranks):
    single = _trainer().evaluate(DataLoader(EVAL, batch_size=37))
    assert single["val_seen"] == 37
    for out in ranks:
        _close(out["evaluate"], single)
        _close(out["evaluate_iterable"], single)


def test_predict_gives_every_sample_once_in_dataset_order(ranks):
    single = _trainer().predict(DataLoader(EVAL, batch_size=37))
    for out in ranks:
        for key in ("predict", "predict_iterable"):
            assert out[key].shape == (37, 3)
            torch.testing.assert_close(out[key], single, rtol=1e-5, atol=1e-6)


def test_a_rank_without_any_batch_still_takes_part(ranks):
    one = DataLoader(make_dataset(1, seed=2), batch_size=4)
    single, single_predict = _trainer().evaluate(one), _trainer().predict(one)
    for out in ranks:
        _close(out["evaluate_one"], single)
        torch.testing.assert_close(out["predict_one"], single_predict)


def test_an_iterable_that_gives_a_rank_nothing_is_an_error_on_every_rank(ranks):
    for out in ranks:
        assert "rank(s) [1] got no batch" in out["empty_error"]


def test_fit_with_an_uneven_val_loader_finishes(ranks):
    for out in ranks:
        assert len(out["history"]["val_loss"]) == 2
    assert ranks[0]["history"] == ranks[1]["history"]
