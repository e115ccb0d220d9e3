"""Any training job on real ranks: token-weighted accumulation is exact on one and two ranks, metrics and
predict are exact on 2 ranks (models that compute their own loss, and the errors: tests/unit/test_any_job.py).

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
from support.metrics import PlainAccuracy

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
