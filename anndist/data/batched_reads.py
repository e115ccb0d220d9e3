"""In-memory datasets read a batch at a time: one gather per tensor instead of one read per sample.

A ``DataLoader`` over a ``TensorDataset`` reads each batch sample by sample (``dataset[i]``, a tuple
of one-row tensors, for every index) and ``default_collate`` stacks the rows back together: about
100 us of Python per batch of 32, a fifth of the small workload's micro-batch. Where anndist rebuilds
a loader anyway (``sampler.py``) and the loader would collate with torch's ``default_collate``, a
``TensorDataset``, or a ``Subset`` of one (what ``random_split`` returns), is read through
``__getitems__`` (torch's batched-read protocol) with one ``index_select`` per tensor: the same
samples in the same order, the same values, dtypes and shapes, and the same type (a list, one
tensor per dataset tensor) as ``default_collate`` makes of them, about 4x faster. Anything else (a
subclass with its own ``__getitem__``, a custom ``collate_fn``, sparse tensors) is read as given.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate


class BatchReadTensorDataset(TensorDataset):
    """A ``TensorDataset`` whose batches are gathered whole (``DataLoader`` calls ``__getitems__``)."""

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        if not len(self):  # index_select would raise a RuntimeError; a read past the end is an IndexError
            raise IndexError(f"indices {indices} are out of range: the dataset is empty")
        index = torch.from_numpy(np.asarray(indices, dtype=np.int64))  # ~4x cheaper than torch.as_tensor(list)
        return [tensor.index_select(0, index if tensor.device.type == "cpu" else index.to(tensor.device))
                for tensor in self.tensors]


def already_collated(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    """The ``collate_fn`` of a batch read whole: ``__getitems__`` returned it collated."""
    return batch


def batched_reads(dataset: Dataset, collate_fn: Callable | None) -> tuple[Dataset, Callable | None]:
    """``(dataset, collate_fn)`` for a rebuilt loader: the batch-reading pair where it gives exactly
    what ``default_collate`` would, else the two as given."""
    if collate_fn is not default_collate:
        return dataset, collate_fn
    if _plain_tensors(dataset):
        return BatchReadTensorDataset(*dataset.tensors), already_collated
    if type(dataset) is Subset and _plain_tensors(dataset.dataset):
        return Subset(BatchReadTensorDataset(*dataset.dataset.tensors), dataset.indices), already_collated
    return dataset, collate_fn


def _plain_tensors(dataset: Any) -> bool:
    return type(dataset) is TensorDataset and all(tensor.layout == torch.strided for tensor in dataset.tensors)
