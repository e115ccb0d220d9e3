"""What each rank says about itself before any measurement: software, place in the job, threads, device.

A pure function of the environment mapping and this process (its CPU affinity, torch, the entry
script's bytes), so that the checks in ``verdict.py`` can be fed any job's facts in a test.
"""
from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path
from typing import Any, Mapping

import torch

from ..dist.env import detect_env
from ..dist.host import host_name
from ..version import __version__

SOFTWARE = ("python", "torch", "anndist", "entry_sha256")


def rank_facts(environ: Mapping[str, str], rank: int, world_size: int, device: torch.device,
               entry: str | os.PathLike | None) -> dict[str, Any]:
    """This rank's facts as a plain dict (pickled to rank 0): see the keys below."""
    env = detect_env(environ)
    return {
        "rank": rank, "world_size": world_size, "host": host_name(environ),
        "launcher": env.launcher, "local_rank": env.local_rank if world_size > 1 else 0,
        "local_world_size": env.local_world_size if world_size > 1 else 1,
        "nodes_stated": stated_nodes(environ, env.launcher),
        "job_nodes": _int_or_none(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES")),
        "python": platform.python_version(), "torch": torch.__version__, "anndist": __version__,
        "entry": os.path.basename(os.fspath(entry)) if entry else None, "entry_sha256": entry_hash(entry),
        "threads": torch.get_num_threads(), "cpus": sorted(_affinity()),
        "device": str(device), "device_id": device_id(device),
    }


def stated_nodes(environ: Mapping[str, str], launcher: str) -> dict[str, int]:
    """The node counts the launcher states, by variable: the ranks must run on that many hosts."""
    stated: dict[str, int] = {}
    if launcher == "torchrun" and _int_or_none(environ.get("GROUP_WORLD_SIZE")) is not None:
        stated["GROUP_WORLD_SIZE"] = int(environ["GROUP_WORLD_SIZE"])  # torchrun's --nnodes, as agents
    if launcher == "slurm":
        step_nodes = _int_or_none(environ.get("SLURM_STEP_NUM_NODES"))
        if step_nodes is not None:
            stated["SLURM_STEP_NUM_NODES"] = step_nodes  # srun's nodes for this step
    return stated


def entry_hash(entry: str | os.PathLike | None) -> str | None:
    """The first 16 hex digits of the entry script's SHA-256 (None without one; the error if unreadable)."""
    if not entry:
        return None
    try:
        return hashlib.sha256(Path(entry).read_bytes()).hexdigest()[:16]
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"


def device_id(device: torch.device) -> str | None:
    """What tells two GPUs apart on a node (the device UUID); None for the CPU, which ranks share."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    return str(getattr(properties, "uuid", f"cuda:{index}"))


def _affinity() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
