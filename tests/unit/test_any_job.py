"""Any training job in one process: models that compute their own loss, a Trainer subclass's loss step,
and the errors that name the problem."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anndist import Trainer
from support import make_dataset, make_model
from support.metrics import PlainAccuracy


# ---------------------------------------------------------------- models that compute their own loss
class OwnLoss(nn.Module):
    """A Hugging Face-style model: keyword batch, an output with .loss and .logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model(hidden=16)

    def forward(self, features, labels=None):
        logits = self.net(features)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _keyword_batches(n: int = 24, b: int = 6):
    x, y = make_dataset(n).tensors
    return [{"features": x[i:i + b], "labels": y[i:i + b]} for i in range(0, n, b)]


def test_a_model_that_computes_its_own_loss_trains_evaluates_and_predicts_without_a_criterion():
    model = OwnLoss()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), progress_bar=False,
                      metrics={"plain": PlainAccuracy()})
    batches = _keyword_batches()
    before = trainer.evaluate(batches)
    history = trainer.fit(batches, num_epochs=3, val_loader=batches)
    assert history["train_loss"][-1] < history["train_loss"][0] and history["val_loss"][-1] < before["val_loss"]
    assert len(history["val_plain"]) == 3  # metrics land in the history (and logs, JSONL, monitors)
    predictions = trainer.predict(batches)
    with torch.no_grad():
        expected = model.net(torch.cat([b["features"] for b in batches]))
    torch.testing.assert_close(predictions, expected)


def test_a_trainer_subclass_can_replace_the_loss_step():
    class Halved(Trainer):
        def compute_loss(self, model, batch):
            return 0.5 * super().compute_loss(model, batch)

    model = OwnLoss()
    loss = Halved(model, torch.optim.SGD(model.parameters(), lr=0.0), progress_bar=False).evaluate(_keyword_batches())
    model = OwnLoss()
    plain = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), progress_bar=False).evaluate(_keyword_batches())
    assert loss["val_loss"] == pytest.approx(0.5 * plain["val_loss"])


# ---------------------------------------------------------------- errors that name the fix
def test_errors_name_the_problem_and_the_fix():
    model = OwnLoss()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="a dict batch needs the keys 'inputs' and 'targets', got keys .*features"):
        Trainer(model, sgd, nn.CrossEntropyLoss(), progress_bar=False).fit(_keyword_batches(), num_epochs=1)
    with pytest.raises(TypeError, match="compute_loss must return a scalar loss tensor or \\(loss, num_items\\), "
                                        "got a tensor of shape \\(6, 3\\)"):
        Trainer(model, sgd, compute_loss=lambda m, b: m(**b)["logits"], progress_bar=False).fit(
            _keyword_batches(), num_epochs=1)
    with pytest.raises(ValueError, match="num_items=0 on every rank for optimizer step 1"):
        Trainer(model, sgd, compute_loss=lambda m, b: (m(**b)["loss"] * 0, 0), progress_bar=False).fit(
            _keyword_batches(), num_epochs=1)
    plain = make_model()
    no_criterion = Trainer(plain, torch.optim.SGD(plain.parameters(), lr=0.1), progress_bar=False)
    with pytest.raises(TypeError, match="the Trainer has no criterion, so the model must compute its loss, but it "
                                        "returned a tensor of shape \\(6, 3\\)"):
        no_criterion.fit([b["features"] for b in _keyword_batches()], num_epochs=1)
    with pytest.raises(TypeError, match="no criterion, so it calls model\\(\\*batch\\) .* pass criterion=..."):
        no_criterion.fit([(b["features"], b["labels"]) for b in _keyword_batches()], num_epochs=1)
    with pytest.raises(TypeError, match="metrics\\['f1'\\] \\(object\\) has no \\['update', 'compute', 'reset'\\]"):
        Trainer(model, sgd, metrics={"f1": object()})
    with pytest.raises(TypeError, match="compute_loss must be a function, got int 3"):
        Trainer(model, sgd, compute_loss=3)
