"""Where this process sits in the job: a pure function of the environment mapping.

Order of precedence: torchrun's variables, then SLURM tasks started by ``srun`` without torchrun,
then a single process. Nothing here writes ``os.environ``: the process group is created from the
returned :class:`DistEnv` (see ``process_group.py``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

DEFAULT_MASTER_ADDR = "127.0.0.1"
# Ports derived from a SLURM job id fall in [SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN).
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class DistEnv:
    """Rank layout of this process and how to reach the rendezvous."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = DEFAULT_MASTER_ADDR
    master_port: int = 29500
    launcher: str = "none"  # "torchrun", "slurm" or "none"
    restart_count: int = 0  # torchrun: how many times the agent restarted the workers
    agent_store: bool = False  # torchrun: the workers share the agent's TCPStore

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def init_method(self) -> str:
        # torchrun workers must use env:// so that they join the agent's store when
        # TORCHELASTIC_USE_AGENT_STORE is set; srun tasks rendezvous on the first node.
        if self.launcher == "torchrun":
            return "env://"
        return f"tcp://{self.master_addr}:{self.master_port}"


def detect_env(environ: Mapping[str, str]) -> DistEnv:
    """Return the :class:`DistEnv` described by ``environ`` (torchrun, then SLURM, then none)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return _from_torchrun(environ)
    if _is_slurm_task(environ):
        return _from_slurm(environ)
    return DistEnv()


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None:
        if default is None:
            raise RuntimeError(f"environment variable {name} is required but not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    rank = _int(environ, "RANK")
    world_size = _int(environ, "WORLD_SIZE")
    local_rank = _int(environ, "LOCAL_RANK", 0)
    _check_layout(rank, world_size, local_rank, "RANK", "WORLD_SIZE")
    return DistEnv(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=_int(environ, "LOCAL_WORLD_SIZE", world_size),
        master_addr=environ.get("MASTER_ADDR", DEFAULT_MASTER_ADDR),
        master_port=_int(environ, "MASTER_PORT", 29500),
        launcher="torchrun",
        restart_count=_int(environ, "TORCHELASTIC_RESTART_COUNT", 0),
        agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
    )


def _is_slurm_task(environ: Mapping[str, str]) -> bool:
    # The batch shell also carries SLURM_PROCID=0; only srun tasks belong to a job step.
    return "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ and "SLURM_NTASKS" in environ


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    rank = _int(environ, "SLURM_PROCID")
    world_size = _int(environ, "SLURM_NTASKS")
    local_rank = _int(environ, "SLURM_LOCALID", 0)
    _check_layout(rank, world_size, local_rank, "SLURM_PROCID", "SLURM_NTASKS")
    if "MASTER_ADDR" in environ:
        master_addr = environ["MASTER_ADDR"]
    else:
        # Rank 0 runs on the first node of the *step*, which differs from the job's first node when
        # srun runs on part of the allocation (``srun -w node2``); in a step SLURM_NODELIST is the job's.
        nodelist = next((environ[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                         if environ.get(k)), "")
        master_addr = first_host(nodelist)
    if "MASTER_PORT" in environ:
        master_port = _int(environ, "MASTER_PORT")
    else:
        master_port = SLURM_PORT_BASE + _int(environ, "SLURM_JOB_ID", 0) % SLURM_PORT_SPAN
    return DistEnv(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=_slurm_local_world_size(environ, world_size),
        master_addr=master_addr or DEFAULT_MASTER_ADDR,
        master_port=master_port,
        launcher="slurm",
    )


def _slurm_local_world_size(environ: Mapping[str, str], world_size: int) -> int:
    """Tasks of this step on this node: SLURM_STEP_TASKS_PER_NODE ("2(x3),1") at SLURM_NODEID."""
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "")
    counts = expand_tasks_per_node(spec)
    node = _int(environ, "SLURM_NODEID", 0)
    return counts[node] if 0 <= node < len(counts) else world_size


def expand_tasks_per_node(spec: str) -> list[int]:
    """``"2(x3),1"`` -> ``[2, 2, 2, 1]``; an unreadable spec gives ``[]``."""
    counts: list[int] = []
    for group in filter(None, spec.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", group.strip())
        if match is None:
            return []
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def _check_layout(rank: int, world_size: int, local_rank: int, rank_name: str, size_name: str) -> None:
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise RuntimeError(
            f"inconsistent launcher environment: {rank_name}={rank}, {size_name}={world_size}, "
            f"local rank {local_rank}; expected 0 <= rank < world size"
        )


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist such as ``"gpu[003-005,010],cpu1"`` -> ``"gpu003"``."""
    nodelist = nodelist.strip()
    if not nodelist:
        return ""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if match is None:
        return ""
    prefix, _, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first
