"""Inputs ahead of time: on CUDA, the next batch is copied to the GPU while the current step computes.

``ahead(batches, device)`` replaces ``with_last`` (one batch of look-ahead, to know the epoch's last
micro-batch) where the epoch reader already reads one batch ahead (equal shards). On CUDA each batch's
copy starts when it is fetched, one batch before it is used: ``non_blocking`` copies on a side stream
(truly asynchronous from pinned memory: ``DataLoader(pin_memory=True)``), an event recorded after
them; when the batch is handed to the step, the compute stream waits on that event (the GPU waits,
not the host) and every tensor is ``record_stream``-ed on the compute stream, so the caching
allocator does not hand its memory out again while the step may still read it. The wait shows in a
profile as ``anndist.wait_for_batch``. ``prepare_batch``/``to_device`` then find the tensors on the
device and copy nothing.

Anywhere else (the CPU, other devices) it is ``with_last`` itself: batches are moved in the step as
before, and training is unchanged. Loaders that decide their own shards (the agreed-window path of
``epoch_reader.py``) are not read ahead, so a stateful loader's position counts the batches trained.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable, Iterator

import torch

from ..step.accumulation import with_last
from .batch import to_device


def ahead(batches: Iterable, device: torch.device) -> Iterator[tuple[Any, bool]]:
    """``(batch, is_last)`` like ``with_last``; on CUDA the batches come already on ``device``."""
    if device.type != "cuda":
        return with_last(batches)
    return _copied_ahead(batches, CudaCopier(device))


def _copied_ahead(batches: Iterable, copier: "CudaCopier") -> Iterator[tuple[Any, bool]]:
    # with_last fetches batch i + 1 (starting its copy) before it yields batch i
    for started, is_last in with_last(copier.start(batch) for batch in batches):
        yield copier.ready(started), is_last


class CudaCopier:
    """Copies batches to ``device`` on a side stream; ``ready`` hands one over to the compute stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def start(self, batch: Any) -> tuple[Any, torch.cuda.Event]:
        with torch.cuda.stream(self.stream):
            moved = to_device(batch, self.device, non_blocking=True)
            return moved, self.stream.record_event()

    def ready(self, started: tuple[Any, torch.cuda.Event]) -> Any:
        moved, copied = started
        with torch.profiler.record_function("anndist.wait_for_batch"):
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)
            for tensor in tensors(moved):
                if tensor.device.type == "cuda":
                    tensor.record_stream(compute)
        return moved


def tensors(data: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested tuple/list/dict structure."""
    if isinstance(data, torch.Tensor):
        yield data
    elif isinstance(data, Mapping):
        for value in data.values():
            yield from tensors(value)
    elif isinstance(data, (tuple, list)):
        for value in data:
            yield from tensors(value)
