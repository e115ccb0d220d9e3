"""Numbers that went wrong without a word, on 2 ranks: a NaN loss with finite gradients, a skipped NaN in
train_loss, BatchNorm buffers at evaluate() (a resume with another gradient_accumulation_steps: tests/unit)."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import NonFiniteLossError, Trainer
from anndist.dist import collectives
from support import make_dataset, make_model, run_spawn


class NaNTermOnRank(nn.Module):
    """Cross-entropy plus a constant NaN on one rank at its ``call``-th micro-batch: the loss is NaN,
    its gradients are finite (``times=True``: the loss times NaN, gradients NaN too)."""

    def __init__(self, rank, call, times=False):
        super().__init__()
        self.rank, self.call, self.calls, self.times = rank, call, 0, times

    def forward(self, outputs, targets):
        self.calls += 1
        loss = nn.functional.cross_entropy(outputs, targets)
        if collectives.rank() == self.rank and self.calls == self.call:
            loss = loss * float("nan") if self.times else loss + torch.tensor(float("nan"))
        return loss


def _trainer(model, criterion, **options):
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), criterion, progress_bar=False, **options)


def _nan_error(bad_rank, **options):
    """The NonFiniteLossError's message when ``bad_rank``'s 6th loss is NaN with finite gradients."""
    try:
        _trainer(make_model(), NaNTermOnRank(bad_rank, 6), gradient_accumulation_steps=2, **options).fit(
            DataLoader(make_dataset(64), batch_size=4), num_epochs=1)
    except NonFiniteLossError as exc:
        return str(exc)
    return None


def _nan_with_finite_grads(rank):
    error = _nan_error(1)
    skipping = _trainer(make_model(), NaNTermOnRank(1, 6, times=True), gradient_accumulation_steps=2, on_nonfinite="skip")
    history = skipping.fit(DataLoader(make_dataset(64), batch_size=4), num_epochs=1)
    return {"error": error, "skip_steps": skipping.global_step, "train_loss": history["train_loss"][0]}


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _batchnorm(rank):
    model = _bn_model()
    trainer = _trainer(model, nn.CrossEntropyLoss())
    trainer.fit(DataLoader(make_dataset(64), batch_size=8), num_epochs=1)
    buffers = [b.clone() for b in model.buffers()]
    rank0 = collectives.broadcast_object(buffers)
    differed = any(not torch.equal(a, b) for a, b in zip(buffers, rank0))
    reference = copy.deepcopy(model).eval()  # rank 0's buffers over the whole dataset, in this process
    for b, b0 in zip(reference.buffers(), rank0):
        b.copy_(b0)
    x, y = make_dataset(40, seed=5).tensors
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(reference(x), y))
    got = trainer.evaluate(DataLoader(make_dataset(40, seed=5), batch_size=8))["val_loss"]
    return {"differed": differed, "expected": expected, "got": got,
            "same_after": all(torch.equal(a, b) for a, b in zip(model.buffers(), rank0))}


def _all(rank, world_size):
    return {"nan": _nan_with_finite_grads(rank), "bn": _batchnorm(rank), "fsdp_nan": _nan_error(1, strategy="fsdp")}


@pytest.fixture(scope="module")
def results():
    return run_spawn(_all, 2)


def test_nan_loss_with_finite_gradients_stops_every_rank(results):
    for r in results:
        assert r["nan"]["error"] is not None and "non-finite loss on rank(s) [1] at optimizer step 3" in r["nan"]["error"]


def test_nan_loss_is_caught_in_one_process_and_under_fsdp(results):
    # One process and FSDP check the losses inside the step's fused gradient check, not through DDP's all-reduce.
    assert "non-finite loss on rank(s) [0] at optimizer step 3" in (_nan_error(0) or "no error")
    for r in results:
        assert "non-finite loss on rank(s) [1] at optimizer step 3" in (r["fsdp_nan"] or "no error")


def test_skipped_nan_window_stays_out_of_train_loss(results):
    first, second = results[0]["nan"], results[1]["nan"]
    assert first["skip_steps"] == second["skip_steps"] == 4 - 1  # 8 micro-batches per rank, K=2, one skipped
    assert math.isfinite(first["train_loss"]) and first["train_loss"] == second["train_loss"]


def test_evaluate_uses_rank0_buffers_on_every_rank(results):
    assert results[1]["bn"]["differed"], "the ranks' BatchNorm statistics should differ after training"
    for r in results:
        assert r["bn"]["got"] == pytest.approx(r["bn"]["expected"], rel=1e-6, abs=1e-7)
        assert r["bn"]["same_after"]
