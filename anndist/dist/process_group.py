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
import os
import weakref
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .collectives import is_initialized
from .env import DistEnv
from .rendezvous import reporting_wait

logger = logging.getLogger(__name__)

_owned = False  # True when anndist created the default group and must destroy it
_created = 0  # groups anndist created in this process: each one after the first gets its own store prefix
_releasers: "weakref.WeakSet[Any]" = weakref.WeakSet()
_users: "weakref.WeakSet[Any]" = weakref.WeakSet()  # open Trainers on the group anndist created


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


def init_process_group(env: DistEnv, backend: str, timeout: timedelta, user: Any = None) -> bool:
    """Create the default group for ``env`` unless one exists; return True if we created it. ``user``
    (a Trainer) keeps a group anndist created alive until it calls ``release``."""
    global _owned, _created
    if is_initialized() or not env.is_distributed:
        if _owned and user is not None:
            _users.add(user)  # a later Trainer on the group an earlier one created
        return False
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    store = _group_store(env, timeout)
    where = {"store": store} if store is not None else {"init_method": env.init_method}
    with reporting_wait(env, os.environ, timeout):  # a wrong launch says so within seconds
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout, **where)
    _owned, _created = True, _created + 1
    if user is not None:
        _users.add(user)
    atexit.register(teardown)
    return True


def release(user: Any) -> None:
    """``user`` is done with the group; the group anndist created goes when no open Trainer uses it."""
    _users.discard(user)
    if _owned and not _users:
        teardown()


def _group_store(env: DistEnv, timeout: timedelta) -> Any:
    """The store to form the group on, under a prefix of its own; None: the launcher's store as it is.

    A store can outlive a group: torchrun's agent keeps its store across worker restarts, and a process
    that destroys its group and creates another (a second Trainer) meets the first group's keys again,
    so its ranks would read the first group's addresses and wait for peers that are gone (the first
    pytorch#135712, the second a hang). Each group after the first in this process, and each torchrun
    restart on one node, therefore forms under its own prefix. Every rank counts alike: the ranks run
    the same program. Across nodes torchrun's restart counts can differ, so there the fix for restarts
    is ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's environment.
    """
    prefix = []
    if env.launcher == "torchrun" and env.agent_store and env.restart_count > 0:
        if env.local_world_size == env.world_size:
            prefix.append(f"restart{env.restart_count}")
        else:
            logger.warning(
                "torchrun restarted this worker (attempt %d) and shares its store across nodes: set "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun on every node, or the group may connect to "
                "the previous attempt's workers (pytorch#135712)", env.restart_count)
    if _created:
        prefix.append(f"group{_created}")
    if not prefix:
        return None
    if env.launcher == "torchrun" and env.agent_store:  # the agent hosts it: every worker is a client
        store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
    else:  # rank 0 hosts it; multi_tenant reuses a server this process still runs on that port
        store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=env.rank == 0,
                              timeout=timeout, multi_tenant=True)
    return dist.PrefixStore("anndist/" + "/".join(prefix), store)


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
