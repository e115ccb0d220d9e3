"""Run a function on N real processes joined in a gloo process group (spawn + FileStore).

Faster than torchrun for tests that only need a real group: no agent, no port to pick. Each rank's
return value comes back through a file. Use ``torchrun`` (see ``processes.py``) for end-to-end paths.
"""
from __future__ import annotations

import gc
import os
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, fn: Callable, world_size: int, workdir: str, args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(workdir, "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(workdir, f"result{rank}.pt"))
    finally:
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def run_spawn(fn: Callable, world_size: int = 2, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return their results."""
    with tempfile.TemporaryDirectory() as workdir:
        mp.start_processes(_worker, args=(fn, world_size, workdir, args), nprocs=world_size,
                           join=True, start_method="spawn")
        return [torch.load(os.path.join(workdir, f"result{r}.pt"), weights_only=False) for r in range(world_size)]
