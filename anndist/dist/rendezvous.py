"""Saying who waits for whom while the process group forms, so that a wrong launch shows within seconds.

``init_process_group`` blocks until every rank has joined, for up to ``dist_timeout`` (10 minutes by
default), and prints nothing meanwhile. A script started as ``WORLD_SIZE=2 RANK=0 python train.py``
(no torchrun, no srun) waits the whole time for a rank that nothing will ever start. While the group
forms, a daemon thread reports after a few seconds, and then every minute, which rank waits for which,
at which address, and what starts the other ranks. It only reads the clock and logs; the group is
formed (or fails) exactly as without it.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import timedelta
from typing import Iterator, Mapping

from .env import DistEnv

logger = logging.getLogger(__name__)

FIRST_REPORT_S = 5.0       # no launcher in sight: likely a wrong launch, say so at once
LAUNCHED_FIRST_REPORT_S = 30.0  # torchrun or srun started the ranks together: only a slow start waits this long
REPORT_EVERY_S = 60.0


def started_by(env: DistEnv, environ: Mapping[str, str]) -> str | None:
    """``"torchrun"`` or ``"srun"`` when one of them started this process, else None (variables set by hand)."""
    if env.launcher == "slurm":
        return "srun"
    if env.launcher == "torchrun" and "TORCHELASTIC_RUN_ID" in environ:
        return "torchrun"
    return None


def waiting_message(env: DistEnv, environ: Mapping[str, str], waited_s: float, timeout: timedelta) -> str:
    """One line: this rank, whom it waits for, where, what starts the others, and when it gives up."""
    where = f"{env.master_addr}:{env.master_port}"
    others = env.world_size - 1
    ranks = "rank 1" if others == 1 else f"ranks 1-{env.world_size - 1}"
    if env.rank == 0:
        who = f"rank 0 of {env.world_size} has waited {waited_s:.0f} s at {where} for the other {others} ({ranks})"
    else:
        who = (f"rank {env.rank} of {env.world_size} has waited {waited_s:.0f} s for rank 0 at {where} and the "
               f"other ranks")
    who += f" to join the process group (it gives up after dist_timeout={timeout.total_seconds():.0f} s)"
    launcher = started_by(env, environ)
    if launcher is None:
        return (f"{who}; WORLD_SIZE={env.world_size} and RANK={env.rank} are set in this process's environment, but "
                "neither torchrun nor srun started it, and nothing else starts the other ranks: launch with "
                f"`torchrun --nproc_per_node={env.world_size} your_script.py` (or srun in a Slurm job), or unset "
                "WORLD_SIZE and RANK to run one process")
    return (f"{who}; {launcher} started this process: the missing ranks have not started yet or cannot reach "
            f"{where} (on several nodes: the same {launcher} command on every node, a reachable MASTER_ADDR "
            "and an open port)")


@contextlib.contextmanager
def reporting_wait(env: DistEnv, environ: Mapping[str, str], timeout: timedelta) -> Iterator[None]:
    """Around the group's creation: a warning after a few seconds and every minute until it is formed."""
    done = threading.Event()
    started = time.monotonic()
    first = FIRST_REPORT_S if started_by(env, environ) is None else LAUNCHED_FIRST_REPORT_S

    def report() -> None:
        wait = first
        while not done.wait(wait):  # a timer: nothing waits on this thread
            logger.warning("%s", waiting_message(env, environ, time.monotonic() - started, timeout))
            wait = REPORT_EVERY_S

    thread = threading.Thread(target=report, name="anndist-rendezvous-report", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
