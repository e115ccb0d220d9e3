"""predict(): every sample's output exactly once, in the dataset's order, on every rank.

Each rank runs the bare module over its unpadded evaluation shard (rank r of W reads samples
r, r+W, r+2W, ...), under ``no_grad`` and autocast when enabled; the outputs (``logits`` of a
``ModelOutput``) are moved to the CPU and gathered, and sample i is taken from rank i mod W at
position i div W: the dataset's order. Every rank ends up holding the outputs of the whole dataset in
CPU memory (``main_process_only=True`` keeps them on rank 0 alone, the others get None). A loader
that anndist does not shard (a custom sampler, an ``IterableDataset``) is gathered in rank order.
Where the forward is a collective (FSDP, tensor parallelism), the ranks run as many forwards as the rank
with the most batches (``Strategy.eval_batches``, ``lockstep.py``). Under tensor parallelism W is the
number of data shards (``data``): the ranks of a tensor-parallel group compute the same outputs, and
the gather takes them from one rank of each group (the group of rank 0's "tp" coordinate; the others
gather among themselves, or return None with ``main_process_only``).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist

from ..dist import collectives
from ..dist.data_layout import DataLayout
from ..data.batch import split_batch, to_device
from ..step.loss import call_model, call_on_inputs, predictions_of
from ..step.precision import Precision
from ..data.sampler import ShardSampler


@torch.no_grad()
def predict(module: torch.nn.Module, loader: Iterable, batches: Iterable[tuple[Any, bool]], with_criterion: bool,
            device: torch.device, precision: Precision, main_process_only: bool = False,
            data: DataLayout | None = None) -> torch.Tensor | None:
    """Every sample's output of ``loader``, read as ``batches`` (``Strategy.eval_batches(loader)``)."""
    was_training = module.training
    module.eval()
    try:
        mine = []
        for batch, counts in batches:
            output = _outputs(module, to_device(batch, device, device.type == "cuda"), with_criterion, precision)
            if counts:  # a filler's output is dropped
                mine.append(output)
    finally:
        module.train(was_training)
    _check_shapes([m.shape[1:] for m in mine], "batches of this rank")
    local = torch.cat(mine) if mine else torch.empty(0)
    shards = _gather(local, main_process_only, data or DataLayout(collectives.rank(), collectives.world_size()))
    if shards is None:
        return None
    _check_shapes([s.shape[1:] for s in shards if s.numel()], "ranks")
    if isinstance(getattr(loader, "sampler", None), ShardSampler):
        return _interleave(shards)
    return torch.cat([s for s in shards if s.numel()])


def _outputs(module: torch.nn.Module, batch: Any, with_criterion: bool, precision: Precision) -> torch.Tensor:
    with precision.autocast():
        if with_criterion:  # a criterion batch may carry targets, or be the inputs alone
            output = call_on_inputs(module, _inputs(batch))
        else:
            output = call_model(module, batch)
    output = predictions_of(output)
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"predict() needs tensor outputs (or logits), the model returned a {type(output).__name__}")
    return output.detach().cpu()


def _check_shapes(shapes: list[torch.Size], where: str) -> None:
    if len(set(shapes)) > 1:
        raise ValueError(
            f"predict() got outputs of different shapes across {where} ({sorted(set(map(tuple, shapes)))[:4]}): "
            "they cannot be joined into one tensor per sample; pad every batch to one length (e.g. a collate_fn "
            "with padding to a fixed max_length) or call the model on each batch yourself")


def _inputs(batch: Any) -> Any:
    try:
        return split_batch(batch)[0]
    except TypeError:
        return batch


def _gather(local: torch.Tensor, main_process_only: bool, data: DataLayout) -> list[torch.Tensor] | None:
    if main_process_only and data.replica:  # not in rank 0's group: rank 0 gathers without it
        return None
    if collectives.world_size(data.group) == 1:
        return [local]
    if not main_process_only:
        return collectives.all_gather_object(local, group=data.group)
    shards = [None] * data.world_size if collectives.rank() == 0 else None
    dist.gather_object(local, shards, dst=0, group=data.group)
    return shards


def _interleave(shards: list[torch.Tensor]) -> torch.Tensor:
    """Sample i of the dataset is shard i mod W, position i div W."""
    filled = [s for s in shards if s.numel()]
    if not filled:
        return torch.empty(0)
    total, world = sum(s.shape[0] for s in shards), len(shards)
    out = filled[0].new_empty((total, *filled[0].shape[1:]))
    for rank, shard in enumerate(shards):
        if shard.numel():
            out[rank::world] = shard
    return out
