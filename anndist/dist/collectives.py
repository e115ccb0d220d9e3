"""The collectives anndist uses, written so that they are no-ops in a single process.

Each is called on **every rank** at the same point of the program; that is what keeps ranks in
step. ``run_collectively`` runs a local action (a file write on rank 0, a load on every rank) and
turns a failure on any rank into an error on every rank instead of a hang.

What a rank receives does not grow with the number of ranks, except on the rank that collects
(docs/scale.md): ``gather_object`` sends to one rank only (torch's own all-gathers every object's
size first), ``scatter_object`` gives each rank its own object, and ``run_collectively`` agrees on
one number while every rank succeeds.
"""
from __future__ import annotations

import pickle
from typing import Any, Callable

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size(group: Any = None) -> int:
    """Ranks in ``group`` (None: the default group); 1 when not distributed."""
    return dist.get_world_size(group) if is_initialized() else 1


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: Any = None, group: Any = None) -> torch.Tensor:
    """In-place all-reduce (sum by default) over ``group`` (None: every rank) when distributed; returns ``tensor``."""
    if is_initialized() and world_size(group) > 1:
        dist.all_reduce(tensor, op=op if op is not None else dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_async(tensor: torch.Tensor, group: Any = None) -> Any:
    """Start an in-place sum all-reduce over ``group``; return its work handle (``wait``, ``is_completed``),
    or None when there is no one to reduce with (the tensor is then already the result)."""
    if is_initialized() and world_size(group) > 1:
        return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return None


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj`` (of ``group``, None: every rank), in rank order (one element when alone)."""
    if not (is_initialized() and world_size(group) > 1):
        return [obj]
    gathered: list[Any] = [None] * world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank ``dst`` (None on the others); ``[obj]`` when not distributed.

    The other ranks send and receive nothing else: one number agrees on the largest object's size (an
    all-reduce), then one gather of the objects, each padded to that size, to ``dst`` alone.
    """
    if not (is_initialized() and world_size() > 1):
        return [obj]
    data = pickle.dumps(obj)
    device = device_for_collectives()
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    mine = torch.zeros(8 + int(size.item()), dtype=torch.uint8)
    mine[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
    mine[8:8 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mine = mine.to(device)
    slots = [torch.empty_like(mine) for _ in range(world_size())] if rank() == dst else None
    dist.gather(mine, slots, dst=dst)
    if slots is None:
        return None
    return [_unpack(slot.cpu()) for slot in slots]


def _unpack(slot: torch.Tensor) -> Any:
    length = int(slot[:8].view(torch.int64).item())
    return pickle.loads(slot[8:8 + length].numpy().tobytes())


def scatter_object(objs: list[Any] | None, src: int = 0) -> Any:
    """Rank ``src`` gives rank r ``objs[r]`` (``objs`` is read on ``src`` only); each rank receives its own."""
    if not (is_initialized() and world_size() > 1):
        return objs[0]  # type: ignore[index]
    box: list[Any] = [None]
    dist.scatter_object_list(box, objs if rank() == src else None, src=src)
    return box[0]


def device_for_collectives(group: Any = None) -> torch.device:
    """Where a tensor for a collective on ``group`` lives: the CPU where its backend takes CPU tensors
    (gloo, "cpu:gloo,cuda:nccl"), else this rank's CUDA device (NCCL alone); as torch's object collectives."""
    try:
        kind = dist.distributed_c10d._get_object_coll_device(group)
    except Exception:  # noqa: BLE001 (a torch without it: its groups took CPU tensors)
        kind = "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    module = getattr(torch, kind)
    return torch.device(kind, module.current_device())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def run_collectively(fn: Callable[[], Any], share: tuple[type[Exception], ...] = ()) -> Any:
    """Run ``fn`` on every rank; if it raises on any rank, raise on every rank (no one waits forever).

    An error of a class in ``share`` (the first that matches) is raised on every rank as that class
    with the failing rank's message, the lowest failing rank's when several failed, so that every
    rank can take the same decision on it (a resume falling back to an older checkpoint).

    While every rank succeeds this costs one all-reduce of one number (the lowest failing rank); the
    failing rank's report then travels from it alone, only when there is one.
    """
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as exc:  # re-raised below, after the ranks have compared notes
        error = exc
    if not (is_initialized() and world_size() > 1):
        if error is not None:
            raise error
        return result
    world = world_size()
    lowest = torch.tensor([world - rank() if error is not None else 0], dtype=torch.int64,
                          device=device_for_collectives())
    dist.all_reduce(lowest, op=dist.ReduceOp.MAX)
    if not int(lowest.item()):
        return result
    first = world - int(lowest.item())
    report = None if error is None else (_shared_class(error, share), str(error))
    index, message = broadcast_object(report if rank() == first else None, src=first)
    if index is not None:
        if error is not None and first == rank():
            raise error
        raise share[index](message if first == rank() else f"{message} (on rank {first})") from error
    if error is not None:
        raise error
    raise RuntimeError(f"rank {first} (and perhaps others) failed in a collective step: {message}; see its traceback")


def _shared_class(error: BaseException, share: tuple[type[Exception], ...]) -> int | None:
    return next((i for i, cls in enumerate(share) if isinstance(error, cls)), None)
