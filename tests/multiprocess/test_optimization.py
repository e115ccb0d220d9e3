"""Clipping, schedulers, fp16 overflow and non-finite losses, on two real ranks."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import NonFiniteLossError, Trainer
from support import flat_params, make_dataset, make_model, run_spawn


class NaNOnRank(nn.Module):
    """Cross-entropy that turns NaN on one rank at its ``call``-th micro-batch."""

    def __init__(self, rank, call):
        super().__init__()
        self.rank, self.call, self.calls = rank, call, 0

    def forward(self, outputs, targets):
        self.calls += 1
        loss = nn.functional.cross_entropy(outputs, targets)
        if torch.distributed.get_rank() == self.rank and self.calls == self.call:
            loss = loss * float("nan")
        return loss


def _trainer(model, criterion=None, lr=0.1, **options):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return Trainer(model, optimizer, criterion or nn.CrossEntropyLoss(), **options)


def _fit(trainer, n=64, batch_size=4, epochs=1):
    return trainer.fit(DataLoader(make_dataset(n), batch_size=batch_size), num_epochs=epochs)


CLIP_N, CLIP_B, CLIP_K, CLIP_LR, CLIP_NORM = 52, 4, 2, 1.0, 0.01  # 26 samples per rank: windows 8, 8, 8, 2


def _clipping(rank):
    """fp16 with a GradScaler (its scale, 2**16, would be clipped too if clipping came before unscale_) and
    a short last window (its gradient is corrected by K*B/S = 4 before the clip, not after)."""
    model = make_model()
    trainer = _trainer(model, lr=CLIP_LR, max_grad_norm=CLIP_NORM, gradient_accumulation_steps=CLIP_K,
                       use_amp=True, amp_dtype="fp16")
    norms = []  # the norm of the gradient the optimizer steps with
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))))
    _fit(trainer, n=CLIP_N, batch_size=CLIP_B)
    return {"norms": norms, "steps": trainer.global_step, "params": flat_params(model)}


def _clipping_reference():
    """One process, fp32, the windows of the two ranks as single batches, clipped by hand.

    Rank r reads indices r, r+2, ... in order, so window j of both ranks together is the dataset's
    16 samples 16j..16j+15, and the last, short one is samples 48..51."""
    model, data = make_model(), make_dataset(CLIP_N)
    optimizer = torch.optim.SGD(model.parameters(), lr=CLIP_LR)
    unclipped = []
    for start in range(0, CLIP_N, 2 * CLIP_B * CLIP_K):
        x, y = data[start:start + 2 * CLIP_B * CLIP_K]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        unclipped.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)))
        optimizer.step()
    return flat_params(model), unclipped


def _schedulers(rank):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    per_step = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), scheduler=per_step, gradient_accumulation_steps=4)
    _fit(trainer, epochs=2)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, threshold=10.0, factor=0.5)
    plateau_trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), scheduler=plateau, scheduler_interval="epoch")
    plateau_trainer.fit(DataLoader(make_dataset(32), batch_size=4), num_epochs=3,
                        val_loader=DataLoader(make_dataset(16, seed=3), batch_size=4))
    return {"per_step": (per_step.last_epoch, trainer.global_step), "plateau_lr": optimizer.param_groups[0]["lr"]}


def _fp16_overflow(rank):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), scheduler=scheduler, use_amp=True, amp_dtype="fp16")
    trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # first steps overflow fp16
    stepped = []
    trainer.callbacks.append(_StepLog(stepped))
    _fit(trainer)
    return {"stepped": stepped, "steps": trainer.global_step, "scheduler": scheduler.last_epoch,
            "scale": trainer.precision.scaler.get_scale(), "params": flat_params(model),
            "scaler_state": trainer.state_dict()["scaler"]}


def _nonfinite(rank):
    error = None
    try:
        _fit(_trainer(make_model(), criterion=NaNOnRank(rank=1, call=6), gradient_accumulation_steps=2))
    except NonFiniteLossError as exc:
        error = str(exc)
    model = make_model()
    skipping = _trainer(model, criterion=NaNOnRank(rank=1, call=6), gradient_accumulation_steps=2, on_nonfinite="skip")
    _fit(skipping)
    return {"error": error, "skip_steps": skipping.global_step, "skip_params": flat_params(model)}


from anndist import Callback  # noqa: E402


class _StepLog(Callback):
    def __init__(self, log):
        self.log = log

    def on_batch_end(self, batch_idx, trainer, logs=None):
        self.log.append(logs["stepped"])


def _all(rank, world_size):
    return {"clip": _clipping(rank), "sched": _schedulers(rank), "fp16": _fp16_overflow(rank), "nan": _nonfinite(rank)}


@pytest.fixture(scope="module")
def results():
    return run_spawn(_all, 2)


def test_clipping_once_per_step_after_unscale(results):
    reference, unclipped = _clipping_reference()
    assert min(unclipped) > 10 * CLIP_NORM  # clipping acts on every step, the short last one included
    for r in results:
        clip = r["clip"]
        assert len(clip["norms"]) == clip["steps"] == 4  # 26 samples per rank: windows of 8, 8, 8 and 2
        # Every step uses a gradient of norm max_grad_norm: not max_grad_norm / scale (clipped before
        # unscale_), not 4 * max_grad_norm on the short window (clipped before its correction).
        assert clip["norms"] == pytest.approx([CLIP_NORM] * 4, rel=1e-4)
        # The weights: one clipped step of the mean gradient of each window (fp16 autocast against fp32).
        torch.testing.assert_close(clip["params"], reference, rtol=0, atol=5e-5)
    assert torch.equal(results[0]["clip"]["params"], results[1]["clip"]["params"])


def test_scheduler_steps_once_per_optimizer_step(results):
    for r in results:
        last_epoch, steps = r["sched"]["per_step"]
        assert steps == 4 and last_epoch == steps  # 16 micro-batches per rank and epoch, K=4, 2 epochs
        assert r["sched"]["plateau_lr"] == pytest.approx(0.1 * 0.5**3)


def test_fp16_overflow_skips_the_step_on_every_rank(results):
    first, second = results[0]["fp16"], results[1]["fp16"]
    assert first["stepped"] == second["stepped"]
    skipped = first["stepped"].count(False)
    assert 1 <= skipped < len(first["stepped"]) and first["stepped"][0] is False
    assert first["steps"] == first["scheduler"] == len(first["stepped"]) - skipped
    assert first["scale"] < 2.0**24 and first["scaler_state"]["scale"] == first["scale"]
    assert torch.equal(first["params"], second["params"]) and torch.isfinite(first["params"]).all()


def test_nonfinite_loss_stops_every_rank_naming_step_and_rank(results):
    for r in results:
        assert r["nan"]["error"] is not None
        assert "non-finite loss on rank(s) [1] at optimizer step 3 (epoch 0, batch 5)" in r["nan"]["error"]


def test_nonfinite_loss_can_be_skipped_on_every_rank(results):
    first, second = results[0]["nan"], results[1]["nan"]
    assert first["skip_steps"] == second["skip_steps"] == 4 - 1  # 8 micro-batches per rank, K=2, one skipped
    assert torch.equal(first["skip_params"], second["skip_params"])
    assert torch.isfinite(first["skip_params"]).all()
