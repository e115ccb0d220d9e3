"""Gradient accumulation is exact on 2 ranks and costs one all-reduce round per optimizer step."""
import pytest
import torch

from support import run_spawn
from support.accumulation import B, EPOCHS, K, train_anndist, train_reference


def _two_rank_runs(rank, world_size):
    return {"exact": train_anndist(world_size, B, K), "counted": train_anndist(world_size, B, 4, count_rounds=True),
            "copied": train_anndist(world_size, B, K, ddp_kwargs={"gradient_as_bucket_view": False})}


@pytest.fixture(scope="module")
def two_ranks():
    return run_spawn(_two_rank_runs, 2)


def test_two_ranks_equal_large_batch_training(two_ranks):
    reference, train_loss = train_reference(window=2 * B * K)  # windows of 24, 24 and the short 12
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
