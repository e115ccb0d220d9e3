"""The gradient norm over every rank of a mesh, for gradients split in any mix of ways, and clipping to it.

Under tensor parallelism a model's gradients are split differently from one parameter to the next:
a TP layer's across the "tp" ranks (and, under 2-D, across "dp" too), a layer outside the plan whole
on every rank, or split by FSDP over "dp" only; each is a DTensor on its own mesh, or a plain tensor.
``torch.nn.utils.clip_grad_norm_`` stacks their norms, which needs one mesh. Here each rank sums the
squares of the parts it holds, per class of "how many ranks hold a copy of this part" (a part split
over all W ranks: 1 copy; split over the 2 "tp" ranks of a 4-rank grid: 2 copies; whole: W), one
SUM all-reduce adds the classes over every rank, and each class is divided by its copies: the squared
norm of the whole model, identical on every rank.
"""
from __future__ import annotations

import math

import torch

from ..dist import collectives
from .dtensor import local


def copies(grad: torch.Tensor, world_size: int) -> int:
    """How many ranks hold each part of ``grad``: W over the number of different parts."""
    placements = getattr(grad, "placements", None)
    if placements is None:
        return world_size
    parts = 1
    for dim, placement in enumerate(placements):
        if placement.is_partial():
            raise RuntimeError("a gradient is still a partial sum at the optimizer step; its layer's ParallelStyle "
                               "must reduce it (e.g. output_layouts=Replicate())")
        if not placement.is_replicate():  # Shard, or FSDP's _StridedShard over a tensor-parallel Shard
            parts *= grad.device_mesh.size(dim)
    return world_size // parts


def clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> float:
    """Scale ``grads`` so that their global norm is at most ``max_norm``; return the norm before clipping."""
    world = collectives.world_size()
    classes: dict[int, list[torch.Tensor]] = {}
    for grad in grads:
        classes.setdefault(copies(grad, world), []).append(local(grad))
    if not classes:
        return 0.0
    device = next(iter(classes.values()))[0].device
    sums = torch.stack([torch.stack([n.double() for n in torch._foreach_norm(parts, 2)]).square().sum()
                        for parts in classes.values()]).to(device)
    collectives.all_reduce(sums)
    total = math.sqrt(sum(value / count for value, count in zip(sums.tolist(), classes)))
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1.0:
        for parts in classes.values():
            torch._foreach_mul_(parts, coefficient)
    return total
