"""Joining the job: where this process sits (the launcher's environment), its device, and the process group.

The Trainer's first step. Rank-zero logging is decided here, before the group forms, so that a rank
waiting for the others can say so once (``rendezvous.py``); and again after it, because a group the
user made may number its ranks otherwise.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .. import log
from . import collectives, process_group
from .device import default_device
from .env import DistEnv, detect_env
from .flight_recorder import enable_flight_recorder


@dataclass(frozen=True)
class Joined:
    """This process in the job: the launcher's ``env``, its ``device``, and whether it ``created`` the group."""

    env: DistEnv
    device: torch.device
    created: bool
    rank: int
    world_size: int


def join(cfg: Any, owner: Any) -> Joined:
    """Pick the device (``cfg.device``, else ``cuda:LOCAL_RANK`` or the CPU) and join the process group,
    creating it when the launcher asks for several ranks and none exists; ``owner`` (the Trainer) keeps a
    group anndist created alive until it closes. ``cfg`` is a TrainerConfig."""
    env = detect_env(os.environ)
    device = cfg.device or default_device(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = cfg.backend or process_group.default_backend(device)
    if cfg.watchdog_timeout is not None:
        enable_flight_recorder(backend, cfg.checkpoint_dir)
    log.configure(env.rank)  # the one rank-zero decision for every log line, the wait's included
    created = process_group.init_process_group(env, backend, cfg.dist_timeout, owner)
    rank, world_size = collectives.rank(), collectives.world_size()
    log.configure(rank)  # a group made by the user may number its ranks otherwise
    return Joined(env, device, created, rank, world_size)
