"""batched_reads.py: a rebuilt loader over in-memory tensors reads whole batches and yields exactly
what the stock per-sample read and ``default_collate`` yield; anything else is read as given."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate, random_split

from anndist import Trainer
from anndist.data.batched_reads import BatchReadTensorDataset, already_collated, batched_reads
from anndist.data.sampler import ResumableDistributedSampler
from support import flat_params, make_dataset, make_model


def _tensors(n: int = 53) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 9, (n,), generator=g),
                         torch.randint(0, 255, (n, 2, 3), generator=g, dtype=torch.uint8), torch.arange(n) % 2 == 0)


def _batches(dataset: Dataset, collate_fn, num_workers: int = 0) -> list:
    sampler = ResumableDistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=3)
    sampler.set_epoch(4)
    loader = DataLoader(dataset, batch_size=7, sampler=sampler, collate_fn=collate_fn, num_workers=num_workers)
    batches = list(loader)
    assert [len(batch[0]) for batch in batches] == [7, 7, 7, 6]  # rank 1's 27 samples: a short last batch
    return batches


def _assert_same_batches(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for batch, reference in zip(got, expected):
        assert type(batch) is type(reference) is list and len(batch) == len(reference)
        for tensor, want in zip(batch, reference):
            assert tensor.dtype == want.dtype and tensor.shape == want.shape and tensor.is_contiguous()
            assert torch.equal(tensor, want)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_tensor_dataset_reads_the_samples_default_collate_gives(num_workers):
    dataset = _tensors()
    batched, collate_fn = batched_reads(dataset, default_collate)
    assert type(batched) is BatchReadTensorDataset and collate_fn is already_collated
    assert all(a is b for a, b in zip(batched.tensors, dataset.tensors))  # no copy of the data
    _assert_same_batches(_batches(batched, collate_fn, num_workers), _batches(dataset, default_collate))


def test_a_subset_of_one_as_random_split_makes_reads_whole_batches_too():
    subset, _ = random_split(_tensors(80), [54, 26], generator=torch.Generator().manual_seed(1))
    batched, collate_fn = batched_reads(subset, default_collate)
    assert type(batched.dataset) is BatchReadTensorDataset and batched.indices is subset.indices
    _assert_same_batches(_batches(batched, collate_fn), _batches(subset, default_collate))


class OwnRows(TensorDataset):
    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        return x * 2, y


@pytest.mark.parametrize("dataset, collate_fn", [
    (_tensors(), lambda samples: default_collate(samples)),  # the user's collate_fn: theirs to call
    (OwnRows(torch.zeros(4, 2), torch.zeros(4)), default_collate),  # a subclass with its own read
    (TensorDataset(torch.eye(4).to_sparse(), torch.zeros(4)), default_collate),  # not strided
    (random_split(OwnRows(torch.zeros(4, 2), torch.zeros(4)), [2, 2])[0], default_collate),
    ([(torch.zeros(2), 0)] * 4, default_collate),  # any other dataset
])
def test_anything_else_is_read_as_given(dataset, collate_fn):
    got_dataset, got_collate = batched_reads(dataset, collate_fn)
    assert got_dataset is dataset and got_collate is collate_fn


class Rows(Dataset):
    """The same tensors, read one sample at a time (no batched read)."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.tensors = dataset.tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index):
        return tuple(tensor[index] for tensor in self.tensors)


def _fit(dataset: Dataset) -> tuple[torch.Tensor, dict, type]:
    model = make_model()
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.01), nn.CrossEntropyLoss(), seed=0,
                      gradient_accumulation_steps=3, handle_signals=False, progress_bar=False)
    loader = DataLoader(dataset, batch_size=8, shuffle=True)
    history = trainer.fit(loader, num_epochs=2, val_loader=DataLoader(dataset, batch_size=16))
    return flat_params(trainer.module), history, type(trainer._loaders.train(loader).dataset)


def test_training_on_a_tensor_dataset_is_bit_identical_to_reading_it_sample_by_sample():
    dataset = make_dataset(70)  # 9 batches: a short last batch and a short last window
    weights, history, read_as = _fit(dataset)
    reference, reference_history, reference_read_as = _fit(Rows(dataset))
    assert read_as is BatchReadTensorDataset and reference_read_as is Rows
    assert torch.equal(weights, reference) and history == reference_history


@pytest.mark.parametrize("size", [0, 3])
def test_the_lockstep_filler_reads_the_first_sample_as_the_loader_reads(size):
    from anndist.evaluation.lockstep import _END, _first_sample
    dataset = _tensors(size)
    stock = DataLoader(dataset, batch_size=4)
    batched = DataLoader(*batched_reads(dataset, default_collate)[:1], batch_size=4, collate_fn=already_collated)
    got, expected = _first_sample(batched), _first_sample(stock)
    if size == 0:
        assert got is _END and expected is _END
    else:
        _assert_same_batches([got], [expected])
        assert got[0].shape == (1, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: run on a GPU machine with bash tests/gpu/run.sh")
def test_a_dataset_held_on_the_gpu_is_gathered_there():
    dataset = TensorDataset(*(tensor.cuda() for tensor in _tensors().tensors))
    batched, collate_fn = batched_reads(dataset, default_collate)
    got = _batches(batched, collate_fn)
    assert {tensor.device.type for batch in got for tensor in batch} == {"cuda"}
    _assert_same_batches(got, _batches(dataset, default_collate))
