"""The README's "Checkpoints and resume" example, run as written (issue 26, case 1): ModelCheckpoint
keeps best.ckpt from the step evaluations, and the requeued job (the same script again) resumes.

The code block is taken from README.md itself; the test supplies only the names it leaves open
(model, optimizer, criterion, train_loader, val_loader): a stream of noisy samples, so that the
validation loss stops improving after a few evaluations and EarlyStopping ends the run long before
``max_steps=20_000``.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from anndist import EarlyStopping, latest_checkpoint
from anndist.checkpoint.file import read_checkpoint
from support import ROOT


def readme_block(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _noisy(n, seed):
    """Labels from a rule, 30% of them replaced at random: learnable, and overfitted after a while."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.where(torch.rand(n, generator=g) < 0.3, torch.randint(0, 3, (n,), generator=g), x[:, :3].argmax(1))
    return TensorDataset(x, y)


class Stream(IterableDataset):
    """A stream read once per epoch (256 samples)."""

    def __init__(self):
        self.data = _noisy(256, seed=3)

    def __iter__(self):
        return iter(self.data)


def _names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
    return {"model": model, "optimizer": torch.optim.Adam(model.parameters(), lr=3e-4),
            "criterion": nn.CrossEntropyLoss(),
            "train_loader": DataLoader(Stream(), batch_size=8),
            "val_loader": DataLoader(_noisy(64, seed=4), batch_size=16)}


def _run(block):
    names = _names()
    exec(compile(block, "README.md (Checkpoints and resume)", "exec"), names)
    trainer = names["trainer"]
    trainer.close()
    return trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long_runs")
    block = readme_block("Checkpoints and resume")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # the example writes runs/exp1 relative to the working folder
        first = _run(block)
        again = _run(block)  # the requeued job: the same script, auto_resume
    return folder, first, again


def test_the_example_keeps_the_best_step_evaluation_in_best_ckpt(runs):
    folder, first, _ = runs
    history = first.history
    stopper = next(cb for cb in first.callbacks if isinstance(cb, EarlyStopping))
    assert stopper.stopped_step is not None and first.global_step < 20_000  # EarlyStopping ended it
    assert history["eval_step"] == list(range(500, first.global_step + 1, 500))
    best = min(range(len(history["val_loss"])), key=history["val_loss"].__getitem__)
    payload = read_checkpoint(folder / "runs" / "exp1" / "best.ckpt")
    state = payload["states"]["train_state"]
    assert state["global_step"] == history["eval_step"][best]
    # The checkpoint holds the evaluation it was saved for: its history and the callbacks' counters.
    assert state["history"]["val_loss"] == history["val_loss"][:best + 1]
    assert payload["metadata"]["best_score"] == history["val_loss"][best]
    early = next(v for k, v in payload["states"]["callbacks"].items() if k.endswith("EarlyStopping"))
    assert (early["best_step"], early["wait"]) == (state["global_step"], 0)
    assert 0 < best < len(history["val_loss"]) - 1  # the val loss improved, then got worse: a real choice


def test_the_requeued_job_resumes_from_the_latest_and_stops_at_once(runs):
    folder, first, again = runs
    assert latest_checkpoint(folder / "runs" / "exp1").name == f"step-{first.global_step:09d}.ckpt"
    assert again.global_step == first.global_step and again.history == first.history
