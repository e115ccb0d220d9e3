"""Gradient accumulation is exact and costs one all-reduce round per optimizer step."""
import pytest
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import DataLoader

from anndist import Callback, Trainer
from support import flat_params, make_dataset, make_model, run_spawn

N, B, K, SEED, EPOCHS, LR = 60, 4, 3, 17, 2, 0.05  # 30 samples per rank: windows of 12, 12 and a short 6 (4 + 2)


class WindowLog(Callback):
    def __init__(self):
        self.ends = []

    def on_backward_end(self, batch_idx, trainer, logs=None):
        self.ends.append((batch_idx, logs["ends_window"]))


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def _train_anndist(world_size, batch_size, k, count_rounds=False, **options):
    model = make_model(hidden=32)
    window_log = WindowLog()
    trainer = Trainer(model, _sgd(model), nn.CrossEntropyLoss(), callbacks=[window_log],
                      gradient_accumulation_steps=k, seed=SEED, **options)
    rounds = []
    if count_rounds:
        def counting_hook(state, bucket):
            state.append((trainer.global_step, bucket.index()))
            return allreduce_hook(None, bucket)
        trainer.model.register_comm_hook(rounds, counting_hook)
    history = trainer.fit(DataLoader(make_dataset(N), batch_size=batch_size, shuffle=True), num_epochs=EPOCHS)
    return {"params": flat_params(trainer.module), "steps": trainer.global_step, "rounds": rounds,
            "ends": window_log.ends, "train_loss": history["train_loss"],
            "bucket_view": getattr(trainer.model, "gradient_as_bucket_view", None)}


def _train_reference(window):
    """Plain single-process training on the same samples, one big batch per optimizer step.

    Returns the final weights and each epoch's train loss: the mean over the epoch's samples of the
    loss each sample had when it was trained (the weights do not change inside a window)."""
    model = make_model(hidden=32)
    optimizer, data = _sgd(model), make_dataset(N)
    train_loss = []
    for epoch in range(EPOCHS):
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(SEED + epoch))  # DistributedSampler's order
        loss_sum = 0.0
        for start in range(0, N, window):
            x, y = data[perm[start:start + window]]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
        train_loss.append(loss_sum / N)
    return flat_params(model), train_loss


def _two_rank_runs(rank, world_size):
    return {"exact": _train_anndist(world_size, B, K), "counted": _train_anndist(world_size, B, 4, count_rounds=True),
            "copied": _train_anndist(world_size, B, K, ddp_kwargs={"gradient_as_bucket_view": False})}


@pytest.fixture(scope="module")
def two_ranks():
    return run_spawn(_two_rank_runs, 2)


def test_two_ranks_equal_large_batch_training(two_ranks):
    reference, train_loss = _train_reference(window=2 * B * K)  # windows of 24, 24 and the short 12
    for result in two_ranks:
        torch.testing.assert_close(result["exact"]["params"], reference, rtol=1e-5, atol=1e-6)
        assert result["exact"]["steps"] == 3 * EPOCHS
        # train_loss weighs every sample alike over both ranks, short last batch and window included.
        assert result["exact"]["train_loss"] == pytest.approx(train_loss, rel=1e-5)


def test_gradients_are_bucket_views_by_default_and_change_nothing(two_ranks):
    # The default saves DDP's copy of each reduced bucket back into the gradients; the weights, short
    # last window's correction included, are the same to the bit as with DDP's own default.
    for result in two_ranks:
        assert result["exact"]["bucket_view"] is True and result["copied"]["bucket_view"] is False
        assert torch.equal(result["exact"]["params"], result["copied"]["params"])
        assert result["exact"]["train_loss"] == result["copied"]["train_loss"]


def test_single_process_equals_large_batch_training():
    result = _train_anndist(1, batch_size=8, k=K)  # 60 samples: windows of 24, 24 and 12 (8 + 4)
    reference, train_loss = _train_reference(window=8 * K)
    torch.testing.assert_close(result["params"], reference, rtol=1e-5, atol=1e-6)
    assert result["train_loss"] == pytest.approx(train_loss, rel=1e-5)


def test_one_allreduce_round_per_optimizer_step(two_ranks):
    for result in two_ranks:
        counted = result["counted"]
        # 30 samples per rank in batches of 4 -> 8 micro-batches -> windows of 4 and 4 -> 2 steps per epoch
        assert counted["steps"] == 2 * EPOCHS
        buckets = {index for _, index in counted["rounds"]}
        rounds_per_step = [sum(1 for step, index in counted["rounds"] if step == s and index == 0)
                           for s in range(counted["steps"])]
        assert rounds_per_step == [1] * counted["steps"]
        assert len(counted["rounds"]) == counted["steps"] * len(buckets)


def test_backward_end_marks_window_ends(two_ranks):
    ends = two_ranks[0]["exact"]["ends"]
    per_epoch = [(b, b in (2, 5, 7)) for b in range(8)]  # windows [0-2], [3-5], [6-7]
    assert ends == per_epoch * EPOCHS
