"""What the example scripts share besides their data: the short-run flag, the thread count, and a
missing optional package reported in one line.

Each example is a plain script: ``python launch/X.py`` runs it in one process, ``torchrun`` (or
``launch/torchrun.sh``, or a SLURM job) on many. Copy what you need into your own entry point.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any, Callable

import torch

from anndist import detect_env
from anndist.optional import MissingDependencyError


def add_common_args(parser: argparse.ArgumentParser, epochs: int) -> None:
    """--epochs, --max-steps, --seed and --log-interval, with the same meaning in every example."""
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--max-steps", type=int, default=None, metavar="N",
                        help="stop after N optimizer steps (fit's max_steps): a quick try-out")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--log-interval", type=int, default=20, help="optimizer steps between log lines")


def limit_threads() -> None:
    """One intra-op thread per process unless ``OMP_NUM_THREADS`` says otherwise.

    The examples' models are tiny: extra threads cost more in hand-offs than they save, and on a
    small machine with other work running a plain ``python`` run was 4x slower per epoch with
    torch's default (one thread per core). torchrun.sh and the SLURM scripts set OMP_NUM_THREADS=1.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def report_missing_dependency(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for an entry point: a missing optional package (``MissingDependencyError``) ends the
    process with status 1 and one line on rank 0, instead of a traceback from every rank."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except MissingDependencyError as exc:
            if detect_env(os.environ).rank == 0:  # every rank fails alike; one of them says so
                print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    return wrapper
