"""The global batch as the unit, on real ranks: a run with ``global_batch_size`` takes the same samples in the
same optimizer steps on 1 and 2 ranks, and resumed on the other number of ranks (2 -> 1 and 1 -> 2,
checkpointed mid-epoch) it ends within 1e-6 of the uninterrupted run, dropout included.

One spawn of 2 ranks runs every 2-rank scenario; the 1-rank runs are in this process.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Trainer
from support import flat_params, make_dataset, make_model, run_spawn
from support.shape import EPOCHS, STEPS_PER_EPOCH, StepSamples, StopAfter, shape_loader, shape_trainer

TOLERANCE = 1e-6


def _run(resume_from=None, stop_after=None, save_to=None, **options) -> dict:
    samples = StepSamples()
    trainer = shape_trainer(samples, [StopAfter(stop_after)] if stop_after else [], **options)
    trainer.fit(shape_loader(), EPOCHS, resume_from=resume_from)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    result = {"params": flat_params(trainer.module), "steps": samples.global_steps(), "history": trainer.history,
              "end": (trainer.epoch, trainer.global_step, trainer.batch_in_epoch), "k": trainer.state.accumulation_steps,
              "lr": trainer.optimizer.param_groups[0]["lr"]}
    trainer.close()
    return result


def _summed() -> torch.Tensor:
    """A criterion with reduction="sum": the gradient is the sum over the step's samples on any W."""
    model = make_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.002), nn.CrossEntropyLoss(reduction="sum"),
                      global_batch_size=12, seed=5, progress_bar=False, handle_signals=False)
    trainer.fit(DataLoader(make_dataset(90), batch_size=3, shuffle=True), num_epochs=1)
    return flat_params(trainer.module)


def _two_ranks(rank, world_size, folder):
    return {"summed": _summed(), "straight": _run(),
            "stopped": _run(stop_after=3, save_to=f"{folder}/two.ckpt"),
            "from_one": _run(resume_from=f"{folder}/one.ckpt"),
            "accumulated": _run(global_batch_size=None, gradient_accumulation_steps=2)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("global_batch")
    one = {"summed": _summed(), "straight": _run(), "stopped": _run(stop_after=5, save_to=f"{folder}/one.ckpt"),
           "accumulated": _run(global_batch_size=None, gradient_accumulation_steps=2)}
    two = run_spawn(_two_ranks, 2, str(folder), timeout=240)
    one["from_two"] = _run(resume_from=f"{folder}/two.ckpt")
    return one, two


def _close(a: dict, b: dict) -> None:
    assert a["end"] == b["end"]
    assert (a["params"] - b["params"]).abs().max() <= TOLERANCE
    assert a["history"].keys() == b["history"].keys()
    for key in a["history"]:
        assert a["history"][key] == pytest.approx(b["history"][key], abs=TOLERANCE)
    assert a["lr"] == b["lr"]  # the per-step schedule went through the same steps


def test_the_same_samples_in_the_same_steps_on_one_and_two_ranks(runs):
    one, two = runs
    assert (one["straight"]["k"], two[0]["straight"]["k"]) == (4, 2)  # 12 samples per step: 4 x 3 and 2 x 3 x 2
    steps = one["straight"]["steps"]
    assert sorted(steps) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert two[0]["straight"]["steps"] == two[1]["straight"]["steps"] == steps
    for epoch in range(EPOCHS):  # every sample once per epoch, 12 per step and 6 in the last
        ids = [steps[epoch * STEPS_PER_EPOCH + s + 1] for s in range(STEPS_PER_EPOCH)]
        assert sorted(i for step in ids for i in step) == list(range(90))
        assert [len(step) for step in ids] == [12] * 7 + [6]


def test_one_and_two_ranks_end_within_float_reassociation(runs):
    one, two = runs
    _close(one["straight"], two[0]["straight"])
    assert torch.equal(two[0]["straight"]["params"], two[1]["straight"]["params"])
    assert (one["summed"] - two[0]["summed"]).abs().max() <= TOLERANCE
    # The comparison has teeth: the same K on 1 and 2 ranks is another global batch, another run.
    assert (one["accumulated"]["params"] - two[0]["accumulated"]["params"]).abs().max() > 1e-3


def test_two_ranks_resumed_on_one_and_one_resumed_on_two(runs):
    one, two = runs
    assert two[0]["stopped"]["end"] == (0, 4, 8)  # stopped mid-epoch 0 after step 4 (8 of its 2-per-step batches)
    assert one["stopped"]["end"] == (0, 5, 20)
    _close(one["from_two"], one["straight"])
    _close(two[0]["from_one"], one["straight"])
    _close(two[0]["from_one"], two[0]["straight"])
    for name, stopped_at in (("from_two", 4), ("from_one", 5)):  # the resumed steps took the same samples
        resumed = one[name] if name == "from_two" else two[0][name]
        assert sorted(resumed["steps"]) == list(range(stopped_at + 1, EPOCHS * STEPS_PER_EPOCH + 1))
        assert all(resumed["steps"][s] == one["straight"]["steps"][s] for s in resumed["steps"])
