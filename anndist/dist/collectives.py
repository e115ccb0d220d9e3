"""The collectives anndist uses, written so that they are no-ops in a single process.

Each is called on **every rank** at the same point of the program; that is what keeps ranks in
step. ``run_collectively`` runs a local action (a file write on rank 0, a load on every rank) and
turns a failure on any rank into an error on every rank instead of a hang.
"""
from __future__ import annotations

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
    """Every rank's ``obj`` in rank order on rank ``dst`` (None on the others); ``[obj]`` when not distributed."""
    if not (is_initialized() and world_size() > 1):
        return [obj]
    gathered: list[Any] | None = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, gathered, dst=dst)
    return gathered


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
    """
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as exc:  # re-raised below, after the ranks have compared notes
        error = exc
    report = None if error is None else (_shared_class(error, share), str(error))
    reports = all_gather_object(report)  # healthy: one object of None per rank, as a flag would be
    failed = [r for r, e in enumerate(reports) if e is not None]
    if not failed:
        return result
    first, (index, message) = failed[0], reports[failed[0]]
    if index is not None:
        if error is not None and first == rank():
            raise error
        raise share[index](message if first == rank() else f"{message} (on rank {first})") from error
    if error is not None:
        raise error
    raise RuntimeError(f"rank(s) {failed} failed in a collective step; see their tracebacks")


def _shared_class(error: BaseException, share: tuple[type[Exception], ...]) -> int | None:
    return next((i for i, cls in enumerate(share) if isinstance(error, cls)), None)
