"""The global batch in one process: K from N, B and the data-parallel world size, with errors that name the
numbers; the sampler's global order on any number of ranks (every sample once per epoch, each step's
samples the same set on any W, every rank the same number of micro-batches, a resume at any step); a
one-process run equal to plain training on those steps, the epoch's short last step included; the
warning of a resume with another global batch. On real ranks: tests/multiprocess/test_global_batch.py."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Trainer
from anndist.data.global_batch import GlobalBatchSampler, accumulation_steps, epoch_shape
from support import flat_params, make_dataset, make_model


def test_k_follows_from_the_global_batch_or_the_error_names_the_numbers():
    loader = DataLoader(make_dataset(8), batch_size=4)
    assert accumulation_steps(None, None, loader, 2) == 1 and accumulation_steps(None, 3, loader, 2) == 3
    assert accumulation_steps(32, None, loader, 2) == 4 and accumulation_steps(32, 4, loader, 2) == 4
    with pytest.raises(ValueError, match=r"global_batch_size=20 .* batch_size=4 on 2 .* multiple of 4 x 2 = 8; "
                                         r"pass global_batch_size=16, or a batch_size among \[1, 2, 5, 10\]$"):
        accumulation_steps(20, None, loader, 2)
    with pytest.raises(ValueError, match=r"pass global_batch_size=98, or a batch_size among \[2, 4, 5, 10\]$"):
        accumulation_steps(100, None, DataLoader(make_dataset(8), batch_size=7), 1)  # the 4 divisors nearest 7
    with pytest.raises(ValueError, match=r"pass global_batch_size=8; no batch_size splits 9: it must also be a "
                                         r"multiple of the 2 ranks$"):
        accumulation_steps(9, None, loader, 2)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=2 contradicts global_batch_size=32: .* = 4"):
        accumulation_steps(32, 2, loader, 2)
    with pytest.raises(ValueError, match="needs the train loader's batch size .* list has batch_size=None"):
        accumulation_steps(32, None, [1, 2], 1)


def test_the_options_are_checked_and_fit_names_a_global_batch_that_does_not_split():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="global_batch_size=0 must be >= 1"):
        Trainer(model, optimizer, nn.CrossEntropyLoss(), global_batch_size=0)
    with pytest.raises(TypeError, match="global_batch_size must be an int or None"):
        Trainer(model, optimizer, nn.CrossEntropyLoss(), global_batch_size="8")
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), global_batch_size=10, progress_bar=False)
    with pytest.raises(ValueError, match="global_batch_size=10 cannot be split into micro-batches of batch_size=4"):
        trainer.fit(DataLoader(make_dataset(16), batch_size=4), num_epochs=1)


def _epoch(n, batch, global_batch, world, epoch=0, start=0, warnings=None):
    samplers = [GlobalBatchSampler(n, global_batch, batch, world, rank, True, 3) for rank in range(world)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
        sampler.set_start(start)
    return samplers, [list(sampler) for sampler in samplers]


@pytest.mark.parametrize("n, batch, world, k", [(90, 3, 2, 2), (91, 2, 3, 1), (25, 1, 4, 2), (7, 2, 2, 1), (64, 4, 4, 2)])
def test_every_step_takes_the_same_samples_on_any_number_of_ranks(n, batch, world, k):
    global_batch = batch * world * k
    samplers, ranks = _epoch(n, batch, global_batch, world)
    assert len({len(batches) for batches in ranks}) == 1  # every rank: the same number of micro-batches
    order = samplers[0].order().tolist()
    steps = [sorted(i for batches in ranks for b in batches[w * k:(w + 1) * k] for i in b)
             for w in range(samplers[0].num_windows())]
    for w, step in enumerate(steps):
        expected = sorted(order[w * global_batch:(w + 1) * global_batch])
        if len(step) == len(expected):  # the short last step repeats samples only when it cannot split them
            assert step == expected
        else:
            assert sorted(set(step)) == expected and len(expected) < world * len(ranks[0][w * k:])
    one, = _epoch(n, batch, global_batch, 1)[1]  # one rank, K * W micro-batches per step: the same steps
    per_step = k * world
    assert [sorted(i for b in one[w * per_step:(w + 1) * per_step] for i in b) for w in range(len(steps))] == [
        sorted(set(s)) if len(s) > len(set(s)) else s for s in steps]
    if n % global_batch == 0 or (-(-(n % global_batch) // batch)) % world == 0:  # then the pieces agree too
        assert sorted(map(tuple, itertools.chain(*ranks))) == sorted(map(tuple, one))


def test_a_resume_starts_at_any_step_and_past_the_end_ends_the_epoch():
    _, full = _epoch(90, 3, 12, 2, epoch=1)
    for step in range(9):
        _, resumed = _epoch(90, 3, 12, 2, epoch=1, start=2 * step)
        assert resumed == [batches[2 * step:] for batches in full]
    samplers, ranks = _epoch(90, 3, 12, 2, start=100)
    assert ranks == [[], []]
    shapes = [epoch_shape(DataLoader(make_dataset(90), batch_sampler=s), 0, first) for s in samplers[:1] for first in (10, 100)]
    assert [shape.windows for shape in shapes] == [3, 0]  # none left, not a negative count that reads as "some"


def test_a_short_last_step_that_cannot_be_split_repeats_and_says_so(warnings):
    samplers, ranks = _epoch(13, 2, 12, 3)  # 1 sample left for 3 ranks
    assert [len(batches) for batches in ranks] == [3, 3, 3] and samplers[0].tail_sizes() == [1, 1, 1]
    assert [b for batches in ranks for b in batches[2:]] == [[samplers[0].order()[12].item()]] * 3
    assert any("holds 1 sample(s), fewer than its 3 micro-batches on 3 rank(s): 2 of them are trained twice" in w
               for w in warnings)


def test_one_process_equals_plain_training_on_the_steps_short_last_step_included():
    model = make_model(hidden=32)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), global_batch_size=12,
                      seed=4, progress_bar=False, handle_signals=False)
    data = make_dataset(90)
    trainer.fit(DataLoader(data, batch_size=3, shuffle=True), num_epochs=2)
    assert trainer.state.accumulation_steps == 4 and trainer.global_step == 16
    reference = make_model(hidden=32)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for epoch in range(2):
        order = torch.randperm(90, generator=torch.Generator().manual_seed(4 + epoch))
        for start in range(0, 90, 12):  # 7 steps of 12 and one of 6: the mean over each step's samples
            x, y = data[order[start:start + 12]]
            optimizer.zero_grad()
            nn.functional.cross_entropy(reference(x), y).backward()
            optimizer.step()
    assert (flat_params(trainer.module) - flat_params(reference)).abs().max() <= 1e-6


def test_a_resume_with_another_global_batch_warns(tmp_path, warnings):
    def trainer(global_batch):
        model = make_model()
        return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), seed=0,
                       global_batch_size=global_batch, progress_bar=False, handle_signals=False)

    first = trainer(8)
    first.fit(DataLoader(make_dataset(32), batch_size=4), max_steps=2)
    first.save_checkpoint(tmp_path / "a.ckpt")
    trainer(8).fit(DataLoader(make_dataset(32), batch_size=4), max_steps=3, resume_from=tmp_path / "a.ckpt")
    assert not any("global_batch_size" in w or "gradient_accumulation_steps" in w for w in warnings)
    trainer(16).fit(DataLoader(make_dataset(32), batch_size=4), max_steps=3, resume_from=tmp_path / "a.ckpt")
    assert any("checkpoint written with global_batch_size=8, resuming with 16" in w for w in warnings)
