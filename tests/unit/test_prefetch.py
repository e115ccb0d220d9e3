"""prefetch.py: on the CPU a pass-through (training unchanged); the look-ahead order of the CUDA path,
run on the CPU with a copier that clones; the CUDA path itself where there is a GPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import anndist.data.epoch_reader
from anndist import Trainer
from anndist.step.accumulation import with_last
from anndist.data.prefetch import _copied_ahead, ahead, tensors
from support import flat_params, make_dataset, make_model


class CloningCopier:
    """The CudaCopier's protocol on the CPU: ``start`` copies (clones) the batch, ``ready`` hands it over."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def start(self, batch):
        self.events.append(("start", int(batch[1][0])))
        return [t.clone() for t in batch], len(self.events)

    def ready(self, started):
        moved, _ = started
        self.events.append(("ready", int(moved[1][0])))
        return moved


def _batches(n: int) -> list[list[torch.Tensor]]:
    return [[torch.full((2, 3), float(i)), torch.tensor([i, i])] for i in range(n)]


def test_on_the_cpu_it_is_with_last_and_yields_the_same_objects():
    batches = _batches(3)
    got = list(ahead(iter(batches), torch.device("cpu")))
    assert [b for b, _ in got] == batches and all(b is o for (b, _), o in zip(got, batches))
    assert [last for _, last in got] == [last for _, last in with_last(batches)] == [False, False, True]
    assert list(ahead(iter([]), torch.device("cpu"))) == []


def test_the_next_copy_starts_before_the_current_batch_is_handed_over():
    copier = CloningCopier()
    got = list(_copied_ahead(iter(_batches(3)), copier))
    assert copier.events == [("start", 0), ("start", 1), ("ready", 0), ("start", 2), ("ready", 1), ("ready", 2)]
    assert [(int(b[1][0]), last) for b, last in got] == [(0, False), (1, False), (2, True)]
    assert list(_copied_ahead(iter([]), CloningCopier())) == []


def test_tensors_walks_nested_batches():
    a, b, c = torch.zeros(1), torch.ones(1), torch.ones(2)
    assert [t is x for t, x in zip(tensors({"x": (a, [b]), "y": c, "n": 3}), (a, b, c))] == [True] * 3


def _train(monkeypatch, copier: bool) -> torch.Tensor:
    if copier:
        monkeypatch.setattr(anndist.data.epoch_reader, "ahead", lambda batches, device: _copied_ahead(batches, CloningCopier()))
    model = make_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), seed=0,
                      gradient_accumulation_steps=3, handle_signals=False, progress_bar=False)
    trainer.fit(DataLoader(make_dataset(70), batch_size=8, shuffle=True), num_epochs=2)  # a short last window
    monkeypatch.undo()
    return flat_params(trainer.module)


def test_training_through_the_look_ahead_is_bit_identical(monkeypatch):
    assert torch.equal(_train(monkeypatch, copier=True), _train(monkeypatch, copier=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_cuda_batches_arrive_on_the_device_and_training_matches_the_cpu_copy_path():
    device = torch.device("cuda", 0)
    seen = []
    for pin in (True, False):
        got = list(ahead(iter(DataLoader(make_dataset(24), batch_size=8, pin_memory=pin)), device))
        seen += [t.device for b, _ in got for t in b]
        assert [last for _, last in got] == [False, False, True]
        expected = [t for b in DataLoader(make_dataset(24), batch_size=8) for t in b]
        for moved, cpu in zip([t for b, _ in got for t in b], expected):
            assert torch.equal(moved.cpu(), cpu)
    assert set(seen) == {device}
