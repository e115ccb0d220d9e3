"""Any training job: token-weighted accumulation is exact, metrics and predict are exact on 2 ranks,
models that compute their own loss, and the errors that name the problem.

The token model is tiny and float64, so "equal to one large batch" can be checked at rtol 1e-5 after
several steps; the padding is deliberately uneven, so a per-micro-batch average differs clearly.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from anndist import Trainer
from support import make_dataset, make_model, run_spawn

V, T, N, B, LR = 11, 6, 28, 2, 0.5  # 28 sequences: per rank of 2, K=3 windows of 6, 6 and a short 2


class Tokens(Dataset):
    """Sequences whose number of real tokens varies from 1 to T (the rest is padding, label -100)."""

    def __init__(self, n: int = N) -> None:
        g = torch.Generator().manual_seed(3)
        self.tokens = torch.randint(0, V, (n, T), generator=g)
        self.lengths = [1 + (i * 5) % T for i in range(n)]

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i):
        targets = self.tokens[i].roll(-1).clone()
        targets[self.lengths[i]:] = -100
        return {"tokens": self.tokens[i], "targets": targets}


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(V, 8), nn.Linear(8, V)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)))


def token_loss(model, batch):
    logits = model(batch["tokens"])
    per_token = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="none", ignore_index=-100)
    n = (batch["targets"] != -100).sum()
    return per_token.sum() / n, n


def _train(world_size: int, k: int) -> torch.Tensor:
    model = TinyLM().double()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=LR), compute_loss=token_loss,
                      gradient_accumulation_steps=k, progress_bar=False)
    trainer.fit(DataLoader(Tokens(), batch_size=B, shuffle=False), num_epochs=1)
    return torch.cat([p.detach().reshape(-1) for p in trainer.module.parameters()])


def _on_ranks(rank, world_size, k):
    return _train(world_size, k)


def _reference(world_size: int, k: int, per_micro_batch_mean: bool = False) -> torch.Tensor:
    """One large batch per optimizer step: the window's sequences on every rank, loss summed over all
    their tokens over the total. With ``per_micro_batch_mean``, the bug the peers had: the mean of the
    micro-batches' own token means."""
    data, model = Tokens(), TinyLM().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    shards = [list(range(r, N, world_size)) for r in range(world_size)]  # DistributedSampler, no shuffle
    per_rank = len(shards[0])
    for start in range(0, per_rank, k * B):
        micro = [shard[i:i + B] for shard in shards for i in range(start, min(start + k * B, per_rank), B)]
        losses, counts = [], []
        for indices in micro:
            batch = {key: torch.stack([data[i][key] for i in indices]) for key in ("tokens", "targets")}
            loss, n = token_loss(model, batch)
            losses.append(loss)
            counts.append(n)
        if per_micro_batch_mean:
            total = torch.stack(losses).mean()
        else:
            total = sum(l * n for l, n in zip(losses, counts)) / sum(counts)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("k", [1, 3])
def test_token_weighted_accumulation_equals_one_large_batch_on_one_and_two_ranks(k):
    expected_one, expected_two = _reference(1, k), _reference(2, k)
    torch.testing.assert_close(_train(1, k), expected_one, rtol=1e-5, atol=1e-9)
    for weights in run_spawn(_on_ranks, 2, k):
        torch.testing.assert_close(weights, expected_two, rtol=1e-5, atol=1e-9)
    # The test has the power to see the per-micro-batch average: it lands far from the exact answer.
    wrong = _reference(2, k, per_micro_batch_mean=True)
    assert (wrong - expected_two).abs().max() > 1e-3


# ---------------------------------------------------------------- metrics and predict on 2 ranks
class PlainAccuracy:
    """A metric that is not torchmetrics: only update/compute/reset, no synchronisation of its own."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.correct, self.total = 0, 0

    def update(self, preds, targets) -> None:
        self.correct += int((preds.argmax(1) == targets).sum())
        self.total += len(targets)

    def compute(self) -> float:
        return self.correct / self.total


def _metrics_and_predict(rank, world_size):
    torchmetrics = pytest.importorskip("torchmetrics")
    model = make_model(hidden=16)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), progress_bar=False,
                      metrics={"f1": torchmetrics.classification.MulticlassF1Score(3, average="macro"),
                               "auroc": torchmetrics.classification.MulticlassAUROC(3), "plain": PlainAccuracy()})
    loader = DataLoader(make_dataset(37), batch_size=5)  # 37: shards of 19 and 18, a short last batch
    return {"metrics": trainer.evaluate(loader), "preds": trainer.predict(loader),
            "main_only": trainer.predict(loader, main_process_only=True)}


def test_metrics_and_predict_on_two_ranks_equal_one_process():
    torchmetrics = pytest.importorskip("torchmetrics")
    data = make_dataset(37)
    model = make_model(hidden=16).eval()
    with torch.no_grad():
        logits = model(data.tensors[0])
    targets = data.tensors[1]
    expected = {
        "val_f1": torchmetrics.functional.classification.multiclass_f1_score(logits, targets, 3, average="macro").item(),
        "val_auroc": torchmetrics.functional.classification.multiclass_auroc(logits, targets, 3).item(),
        "val_plain": (logits.argmax(1) == targets).double().mean().item(),
        "val_loss": F.cross_entropy(logits, targets).item(),
    }
    ranks = run_spawn(_metrics_and_predict, 2)
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # identical on every rank
    for key, value in expected.items():
        assert ranks[0]["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert ranks[0]["metrics"]["val_accuracy"] == pytest.approx(expected["val_plain"], abs=1e-12)
    for rank in ranks:  # every sample once, in dataset order, on every rank
        torch.testing.assert_close(rank["preds"], logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ranks[0]["main_only"], logits, rtol=1e-6, atol=1e-6)
    assert ranks[1]["main_only"] is None


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
