"""Which ranks reached a point of the program, told through the process group's store.

A collective that one rank never reaches waits for the full ``dist_timeout`` and then names no
rank. The store (the key-value server every rank of the group already talks to) answers sooner and
can say who is missing: each rank posts a key, and the others look for it with a short timeout.
It is not the process group, so a thread may use it while the main thread is inside a collective.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist

from . import collectives


def default_store() -> Any:
    """The default group's store (torchrun's TCPStore, a FileStore, ...), or None outside a group."""
    if not collectives.is_initialized():
        return None
    return dist.distributed_c10d._get_default_store()


def post(store: Any, prefix: str, rank: int, value: str = "1") -> None:
    store.set(f"{prefix}/{rank}", value)


def missing_ranks(store: Any, prefix: str, world_size: int, timeout: float) -> list[int]:
    """The ranks that have not posted under ``prefix`` within ``timeout`` seconds ([] when all have)."""
    keys = [f"{prefix}/{r}" for r in range(world_size)]
    try:
        store.wait(keys, timedelta(seconds=timeout))
        return []
    except RuntimeError:  # a timeout (DistStoreError): find out which keys are absent
        return [r for r, key in enumerate(keys) if not store.check([key])]


def read(store: Any, prefix: str, rank: int) -> str | None:
    key = f"{prefix}/{rank}"
    return store.get(key).decode() if store.check([key]) else None
