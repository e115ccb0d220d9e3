"""Creating and tearing down the default process group (the collectives are in ``collectives.py``).

The Trainer creates the group only when the launcher asks for several processes and nobody made
one yet; a group the user made is used as it is and left alone. Teardown follows the recipe that
keeps gloo ranks from aborting at interpreter exit (pytorch#190489): drop every DDP wrapper, collect,
destroy the group, collect again.
"""
from __future__ import annotations

import atexit
import gc
import logging
import weakref
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .collectives import is_initialized
from .env import DistEnv

logger = logging.getLogger(__name__)

_owned = False  # True when anndist created the default group and must destroy it
_releasers: "weakref.WeakSet[Any]" = weakref.WeakSet()


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def check_backend(backend: Any) -> None:
    """Raise an error naming ``backend`` unless torch knows it: "gloo", "nccl", "mpi", "ucc", "xccl", a
    registered one, or a ``"device:backend"`` list such as ``"cpu:gloo,cuda:nccl"``; None is the default."""
    if backend is None:
        return
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string such as 'gloo' or 'nccl', or None (chosen from the device), "
                        f"got {type(backend).__name__} {backend!r}")
    if not dist.is_available():
        return  # init_process_group says so, should a group ever be needed
    known = [name for name in dist.Backend.backend_list if name != dist.Backend.UNDEFINED]
    names = [part.rpartition(":")[2].strip().lower() for part in backend.split(",")]
    if not all(name in known for name in names):
        raise ValueError(f"backend={backend!r} is not a backend torch knows; use one of {known}, a list such as "
                         "'cpu:gloo,cuda:nccl', or None (NCCL for CUDA, gloo for CPU)")


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
        logger.warning(
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
