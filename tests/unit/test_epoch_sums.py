"""The epoch's train_loss: an exact sum, whatever the order of its terms and wherever it is folded."""
from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Callback, Trainer
from anndist.step.exact_sum import ExactSum
from anndist.step.train_state import EpochSums
from support import make_dataset, make_model


def test_exact_sum_ignores_order_and_grouping():
    rng = random.Random(0)
    values = [rng.uniform(-1, 1) * 10.0 ** rng.randint(-12, 12) for _ in range(5000)]
    assert sum(values) != math.fsum(values)  # plain addition would show the difference
    in_pieces = ExactSum()
    for start in range(0, len(values), 777):
        in_pieces.add_all(values[start:start + 777])
    assert in_pieces.value == ExactSum(reversed(values)).value == math.fsum(values)
    resumed = ExactSum(in_pieces.partials)  # what a checkpoint carries
    assert resumed.value == in_pieces.value


def test_exact_sum_keeps_inf_and_nan():
    assert ExactSum([1.0, math.inf, 2.0]).value == math.inf
    assert math.isnan(ExactSum([1.0, math.nan]).value)
    assert ExactSum([1.5e308, 1.5e308, 1.0]).value == math.inf  # past float's range, not an error
    sums = ExactSum([1e300, 1.0])
    sums.add_all([-1e300])
    assert sums.value == 1.0


def _windows(seed: int) -> list[tuple[list[torch.Tensor], list[int]]]:
    rng = random.Random(seed)
    # losses over twelve orders of magnitude, so that a plain float sum would round
    return [([torch.tensor(rng.uniform(0, 5) * 10.0 ** rng.randint(-6, 6)) for _ in range(3)],
             [rng.randint(1, 64) for _ in range(3)]) for _ in range(40)]


@pytest.mark.parametrize("fold_every", [1, 7, 1000])
def test_epoch_sums_do_not_depend_on_where_they_fold(monkeypatch, fold_every):
    monkeypatch.setattr(EpochSums, "FOLD", fold_every)
    reference = EpochSums(0, 1, torch.device("cpu"))
    sums = EpochSums(0, 1, torch.device("cpu"))
    for i, (losses, counts) in enumerate(_windows(0)):
        reference.add_window(losses, counts, stepped=True)
        sums.add_window(losses, counts, stepped=True)
        if i % 5 == 0:
            restored = EpochSums(0, 1, torch.device("cpu"))  # a checkpoint and a resume, mid-epoch
            restored.load_rank_state_dicts([sums.state_dict()])
            sums = restored
    terms = [float(loss) * count for losses, counts in _windows(0) for loss, count in zip(losses, counts)]
    total = sum(count for _, counts in _windows(0) for count in counts)
    assert sums.train_loss(0) == reference.train_loss(0) == math.fsum(terms) / total


def test_epoch_sums_load_the_rounded_sum_of_older_checkpoints():
    sums = EpochSums(0, 1, torch.device("cpu"))
    sums.load_rank_state_dicts([{"loss_sum": 12.5, "items": 5.0}])  # anndist before exact sums
    sums.add_window([torch.tensor(2.5)], [5], stepped=True)
    assert sums.train_loss(0) == 25.0 / 10
    sums.add_window([torch.tensor(float("nan"))], [5], stepped=False)  # a skipped window stays out
    assert sums.train_loss(0) == 25.0 / 10


class LossesBeforeTheStep(Callback):
    def __init__(self) -> None:
        self.terms: list[float] = []
        self.samples = 0

    def on_backward_end(self, batch_idx, trainer=None, logs=None):
        n = 8 if (batch_idx + 1) * 8 <= 70 else 70 % 8
        self.terms.append(float(logs["loss"]) * n)
        self.samples += n


def test_train_loss_is_the_exact_mean_of_the_trained_losses_with_a_short_last_window():
    # 70 samples in batches of 8, windows of 3: the last window holds 22 samples, so the step scales
    # its gradients by 24/22; the window's losses go through the same non-finite check, unscaled.
    model, seen = make_model(), LossesBeforeTheStep()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), seed=0,
                      gradient_accumulation_steps=3, callbacks=[seen], handle_signals=False, progress_bar=False)
    history = trainer.fit(DataLoader(make_dataset(70), batch_size=8, shuffle=True), num_epochs=1)
    assert seen.samples == 70
    assert history["train_loss"] == [math.fsum(seen.terms) / 70]
