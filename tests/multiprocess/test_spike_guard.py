"""The loss-spike guard on 2 ranks: a spike injected on rank 1 only is skipped on every rank at the same
step (watching the loss, reduced over the ranks, or the gradient norm of the all-reduced gradients), the
ranks stay identical, and a run resumed from a checkpoint before the spike is bit-identical, its guard's
record included. One spawn runs every scenario."""
from __future__ import annotations

import sys

import pytest
import torch

from anndist import ModelCheckpoint, SpikeGuard
from anndist.step import accumulation
from support import flat_params, run_spawn
from support.spikes import Spiker, spike_loader, spike_run

SPIKE = (1, 3, 1)  # epoch 1, micro-batch 3 of rank 1 only: optimizer step 12 (8 steps per epoch on 2 ranks)


def _run(watch, folder, resume_from=None, items=False):
    spiker = Spiker([SPIKE], items)
    trainer = spike_run(spiker, SpikeGuard(watch=watch, warmup=8, threshold=10),
                        [ModelCheckpoint(folder, every_n_steps=2, keep_last=None)])
    trainer.fit(spike_loader(), num_epochs=2, resume_from=resume_from)
    result = {"params": flat_params(trainer.module), "events": trainer.state.spike_guard.events,
              "windows": [w[:4] for w in spiker.windows], "step": trainer.global_step,
              "weights": {w[1]: w[4] for w in spiker.windows if w[0] == 1}}
    trainer.close()
    return result


def _items(folder) -> dict:
    """Items mode (``num_items``): the window's loss rides in the item count's all-reduce, counted here."""
    sizes, real = [], accumulation.collectives.all_reduce_async

    def counted(tensor, *group):
        if sys._getframe(1).f_globals["__name__"] == accumulation.__name__:
            sizes.append(tensor.numel())
        return real(tensor, *group)

    accumulation.collectives.all_reduce_async = counted
    try:
        return {**_run("loss", folder, items=True), "reductions": sizes}
    finally:
        accumulation.collectives.all_reduce_async = real


def _ranks(rank, world_size, folder):
    results = {"items": _items(f"{folder}/items")}
    for watch in ("loss", "grad_norm"):
        results[watch] = _run(watch, f"{folder}/{watch}")
        results[f"{watch}-resumed"] = _run(watch, f"{folder}/{watch}", f"{folder}/{watch}/step-000000008.ckpt")
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_spawn(_ranks, 2, str(tmp_path_factory.mktemp("spikes")), timeout=240)


@pytest.mark.parametrize("watch", ["loss", "grad_norm", "items"])
def test_a_spike_on_one_rank_is_skipped_on_every_rank_at_the_same_step(ranks, watch):
    zero, one = ranks[0][watch], ranks[1][watch]
    assert zero["events"] == one["events"] and len(zero["events"]) == 1
    event = zero["events"][0]
    assert (event["action"], event["step"], event["epoch"], event["first_batch"]) == ("skip", 12, 1, 3)
    assert zero["windows"] == one["windows"] and (1, 3, 11, False) in zero["windows"]  # no step, on both
    assert torch.equal(zero["weights"][3], zero["weights"][2])  # the weights did not move
    assert torch.equal(zero["params"], one["params"]) and zero["step"] == 15  # 16 windows, one skipped


@pytest.mark.parametrize("watch", ["loss", "grad_norm"])
def test_resumed_before_the_spike_bit_identical(ranks, watch):
    for rank in (0, 1):
        straight, resumed = ranks[rank][watch], ranks[rank][f"{watch}-resumed"]
        assert torch.equal(resumed["params"], straight["params"])
        assert resumed["events"] == straight["events"]


def test_in_items_mode_the_loss_rides_in_the_item_count_reduction(ranks):
    for rank in (0, 1):  # one all-reduce per window, as items mode has anyway: [items, loss sum]
        assert ranks[rank]["items"]["reductions"] == [2] * 16
