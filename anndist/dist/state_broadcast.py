"""A tree of tensors and plain values (a state dict, a checkpoint's payload) from one rank to all.

What a resume reads once on rank 0 reaches the other ranks this way, instead of every rank reading
the file. The structure and the plain values travel as one small pickled object; the tensors' bytes
as broadcasts straight into tensors allocated on the receivers (small tensors packed together, so
that a state of many small tensors costs a few collectives). Every rank then holds the tree once,
as a load from the file would give it, and receives its bytes once: a broadcast sends each rank the
data one time (a tree over the ranks in gloo, pipelined in NCCL), so what a rank receives does not
grow with the number of ranks. A group that takes no CPU tensors (NCCL alone) carries them through a
buffer on its device, a bounded piece at a time.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .collectives import broadcast_object, device_for_collectives, is_initialized, rank, world_size

PACK_BELOW = 1 << 20  # bytes: smaller tensors travel packed together
PACK_SIZE = 16 << 20  # bytes per pack
STAGING = 64 << 20  # bytes per piece through a device buffer


@dataclass(frozen=True)
class _Slot:
    """Where tensor number ``index`` goes back into the tree."""

    index: int


def broadcast_tree(tree: Any, src: int = 0, staging: torch.device | None = None) -> Any:
    """``tree`` as rank ``src`` has it, on every rank (``src`` gets its own back, nothing copied).

    Dicts (their kind and attributes kept: a module's ``_metadata``), lists and tuples are walked; tensors
    arrive on the CPU, contiguous, with their shape and dtype; anything else travels pickled.
    ``staging``: the device whose buffer carries the bytes, a piece at a time (default: none where the
    group takes CPU tensors, else the group's device).
    """
    if not (is_initialized() and world_size() > 1):
        return tree
    tensors: list[torch.Tensor] = []
    head = (_strip(tree, tensors), [(tuple(t.shape), t.dtype) for t in tensors]) if rank() == src else None
    skeleton, metas = broadcast_object(head, src=src)
    if rank() != src:
        tensors = [torch.empty(shape, dtype=dtype) for shape, dtype in metas]
    if staging is None and device_for_collectives().type != "cpu":
        staging = device_for_collectives()
    for unit in _units(tensors):
        _send_unit(unit, src, staging)
    return tree if rank() == src else _fill(skeleton, tensors)


def _strip(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot(len(tensors) - 1)
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, OrderedDict) else {}
        for key, value in obj.items():
            out[key] = _strip(value, tensors)
        extra = getattr(obj, "__dict__", None)
        if extra and hasattr(out, "__dict__"):
            out.__dict__.update(extra)
        return out
    if isinstance(obj, list):
        return [_strip(value, tensors) for value in obj]
    if type(obj) is tuple:
        return tuple(_strip(value, tensors) for value in obj)
    return obj


def _fill(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, _Slot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _fill(value, tensors)
        return obj
    if isinstance(obj, list):
        return [_fill(value, tensors) for value in obj]
    if type(obj) is tuple:
        return tuple(_fill(value, tensors) for value in obj)
    return obj


def _units(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The tensors in broadcast order: each large one alone, the small ones in packs; empty ones not at all."""
    units: list[list[torch.Tensor]] = []
    pack: list[torch.Tensor] = []
    packed = 0
    for tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if size == 0:
            continue
        if size >= PACK_BELOW:
            units.append([tensor])
            continue
        if packed + size > PACK_SIZE:
            units.append(pack)
            pack, packed = [], 0
        pack.append(tensor)
        packed += size
    if pack:
        units.append(pack)
    return units


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s bytes as a flat uint8 tensor on the CPU (a view where it already is one, contiguous)."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def _send_unit(unit: list[torch.Tensor], src: int, staging: torch.device | None) -> None:
    """One broadcast (or one per staging piece) of ``unit``: ``src`` sends its bytes, the others fill theirs."""
    sending = rank() == src
    if len(unit) == 1:
        buffer = _bytes(unit[0]) if sending else unit[0].view(-1).view(torch.uint8)
    else:
        sizes = [t.numel() * t.element_size() for t in unit]
        buffer = torch.cat([_bytes(t) for t in unit]) if sending else torch.empty(sum(sizes), dtype=torch.uint8)
    _carry(buffer, src, staging)
    if len(unit) > 1 and not sending:
        offset = 0
        for tensor, size in zip(unit, sizes):
            tensor.view(-1).view(torch.uint8).copy_(buffer[offset:offset + size])
            offset += size


def _carry(buffer: torch.Tensor, src: int, staging: torch.device | None) -> None:
    """Broadcast the CPU bytes ``buffer`` from ``src``: directly, or through a ``staging`` buffer in pieces."""
    if staging is None:
        dist.broadcast(buffer, src=src)
        return
    stage = torch.empty(min(STAGING, buffer.numel()), dtype=torch.uint8, device=staging)
    for start in range(0, buffer.numel(), STAGING):
        piece = buffer[start:start + STAGING]
        part = stage[:piece.numel()]
        if rank() == src:
            part.copy_(piece)
        dist.broadcast(part, src=src)
        if rank() != src:
            piece.copy_(part)
