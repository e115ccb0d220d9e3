"""Run a function on N real processes joined in a gloo process group (forkserver + FileStore).

Faster than torchrun for tests that only need a real group: no agent, no port to pick. Each rank's
return value comes back through a file. Use ``torchrun`` (see ``processes.py``) for end-to-end paths.

The ranks are forked from a forkserver that imported torch and anndist once: a fresh interpreter
per rank spent about 1.7 s of CPU on imports alone, a good part of the suite's time on 2 cores.
Forking from that server, not from pytest, keeps the fork single-threaded. A rank gets the caller's
environment of the moment of the launch, as a spawned process would, not the server's.
"""
from __future__ import annotations

import gc
import os
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


PRELOAD = ["torch", "torch.distributed", "torch.distributed.checkpoint", "torch.distributed.fsdp", "anndist"]
mp.set_forkserver_preload(PRELOAD)


def _worker(rank: int, fn: Callable, world_size: int, workdir: str, args: tuple, environ: dict) -> None:
    os.environ.clear()
    os.environ.update(environ, OMP_NUM_THREADS="1")
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


def run_spawn(fn: Callable, world_size: int = 2, *args: Any, timeout: float | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return their results.

    ``timeout``: seconds after which the ranks still running are killed and a TimeoutError says so (for
    tests whose failure would be a hang, not an error)."""
    with tempfile.TemporaryDirectory() as workdir:
        context = mp.start_processes(_worker, args=(fn, world_size, workdir, args, dict(os.environ)),
                                     nprocs=world_size, join=False, start_method="forkserver")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not context.join(None if deadline is None else max(0.0, deadline - time.monotonic())):
            if deadline is not None and time.monotonic() >= deadline:
                for process in context.processes:
                    process.kill()
                    process.join()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish within {timeout} s")
        return [torch.load(os.path.join(workdir, f"result{r}.pt"), weights_only=False) for r in range(world_size)]
