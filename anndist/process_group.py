"""Creating, using and tearing down the default process group.

The Trainer creates the group only when the launcher asks for several processes and nobody made
one yet; a group the user made is used as it is and left alone. Teardown follows the recipe that
keeps gloo ranks from aborting at interpreter exit (pytorch#190489): drop every DDP wrapper, collect,
destroy the group, collect again.
"""
from __future__ import annotations

import atexit
import gc
import time
import weakref
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from .env import DistEnv
from .log import get_logger

_owned = False  # True when anndist created the default group and must destroy it
_releasers: "weakref.WeakSet[Any]" = weakref.WeakSet()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(env: DistEnv, backend: str, timeout: timedelta) -> bool:
    """Create the default group for ``env`` unless one exists; return True if we created it."""
    global _owned
    if is_initialized() or not env.is_distributed:
        return False
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    store = _restart_store(env, timeout)
    where = {"store": store} if store is not None else {"init_method": env.init_method}
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout, **where)
    _owned = True
    atexit.register(teardown)
    return True


def _restart_store(env: DistEnv, timeout: timedelta) -> Any:
    """The agent's store under a per-attempt prefix, for workers that torchrun restarted on one node.

    The agent's store outlives the workers and still holds the previous attempt's addresses, so a
    restarted group connects to dead peers (pytorch#135712). On one node every worker sees the same
    restart count, which makes it a safe prefix; across nodes the counts can differ, so there the
    fix is ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's environment.
    """
    if not (env.launcher == "torchrun" and env.agent_store and env.restart_count > 0):
        return None
    if env.local_world_size != env.world_size:
        get_logger(env.rank).warning(
            "torchrun restarted this worker (attempt %d) and shares its store across nodes: set "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun on every node, or the group may connect to "
            "the previous attempt's workers (pytorch#135712)", env.restart_count)
        return None
    agent = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"anndist/restart{env.restart_count}", agent)


def register_releaser(obj: Any) -> None:
    """``obj.release_distributed()`` is called before the group is destroyed (drops DDP wrappers)."""
    _releasers.add(obj)


def teardown() -> None:
    """Destroy the group anndist created, in the order that exits cleanly. Safe to call twice."""
    global _owned
    for obj in list(_releasers):
        obj.release_distributed()
    if not (_owned and is_initialized()):
        return
    gc.collect()
    dist.destroy_process_group()
    _owned = False
    gc.collect()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
    """In-place all-reduce (sum by default) when distributed; returns ``tensor``."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(tensor, op=op if op is not None else dist.ReduceOp.SUM)
    return tensor


def all_reduce_async(tensor: torch.Tensor) -> Any:
    """Start an in-place sum all-reduce; return its work handle (``wait``, ``is_completed``), or None
    when not distributed (the tensor is then already the result)."""
    if is_initialized() and world_size() > 1:
        return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
    return None


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list when not distributed)."""
    if not (is_initialized() and world_size() > 1):
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class Agreement:
    """A flag that every rank sees set once any rank set it, at the same step on every rank.

    ``propose(flag)`` starts an asynchronous MAX all-reduce of this rank's flag; the result is read
    by the next proposal (or ``settle``), so the collective overlaps a whole step of compute and
    the per-step cost is one tiny message. Ranks call it at the same points, so they decide alike.

    ``period`` > 0 spaces the proposals about ``period`` seconds apart: ``propose`` then reduces
    only every N-th call, N chosen from this rank's recent step time and agreed in the same
    all-reduce (MAX), so every rank proposes at the same calls. A stop then takes effect within
    about ``period`` seconds instead of one step, for 1/N of the per-step cost.
    """

    MAX_INTERVAL = 1000

    def __init__(self, device: torch.device, period: float = 0.0) -> None:
        self._distributed = is_initialized() and world_size() > 1
        self._device = device
        self._period = period
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._interval = 1   # calls between proposals, the same on every rank
        self._countdown = 1  # calls until the next proposal
        self._last: float | None = None  # perf_counter() at the last proposal

    def propose(self, flag: bool) -> bool:
        """Offer this rank's flag; return the agreed flag of the previous proposal (False between proposals)."""
        if not self._distributed:
            return flag
        self._countdown -= 1
        if self._countdown > 0:
            return False
        agreed = self.settle()
        self._countdown = self._interval
        value = torch.tensor([1 if flag else 0, self._wish()], dtype=torch.int32, device=self._device)
        self._pending = (dist.all_reduce(value, op=dist.ReduceOp.MAX, async_op=True), value)
        return agreed

    def _wish(self) -> int:
        """Calls between proposals that would span ``period`` at this rank's recent pace."""
        if self._period <= 0:
            return 1
        now, last, self._last = time.perf_counter(), self._last, time.perf_counter()
        if last is None or now <= last:
            return 1
        per_call = (now - last) / self._interval
        return max(1, min(self.MAX_INTERVAL, int(self._period / per_call)))

    def settle(self) -> bool:
        """Wait for the outstanding proposal (if any) and return its agreed flag."""
        if self._pending is None:
            return False
        work, value = self._pending
        self._pending = None
        work.wait()
        flag, interval = value.tolist()
        self._interval = interval  # every rank reads the same reduced value here
        return bool(flag)

    def decide(self, flag: bool) -> bool:
        """Synchronous agreement: settle what is pending, then reduce ``flag`` now."""
        pending = self.settle()
        if not self._distributed:
            return flag or pending
        value = torch.tensor([1 if flag or pending else 0], dtype=torch.int32, device=self._device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def run_collectively(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank; if it raises on any rank, raise on every rank (no one waits forever)."""
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as exc:  # re-raised below, after the ranks have compared notes
        error = exc
    failed = [r for r, e in enumerate(all_gather_object(error is not None)) if e]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"rank(s) {failed} failed in a collective step; see their tracebacks")
    return result
