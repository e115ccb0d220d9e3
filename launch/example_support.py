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

from anndist import Callback, detect_env
from anndist.optional import MissingDependencyError


def add_common_args(parser: argparse.ArgumentParser, epochs: int) -> None:
    """--epochs, --max-steps, --seed and --log-interval, with the same meaning in every example."""
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--max-steps", type=int, default=None, metavar="N",
                        help="stop after N optimizer steps (N+1 when the stop falls mid-epoch; all ranks alike): "
                             "a quick try-out")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--log-interval", type=int, default=20, help="optimizer steps between log lines")


class MaxSteps(Callback):
    """Stops the run once ``max_steps`` optimizer steps are done.

    ``global_step`` is the same on every rank, so every rank asks to stop after the same step, and
    the Trainer's stop agreement ends them together: after step N at an epoch end, else after N+1
    (a stop set mid-epoch is read at the next step's agreement). A run resumed past N trains nothing.
    """

    def __init__(self, max_steps: int) -> None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps={max_steps!r} must be an int >= 1")
        self.max_steps = max_steps

    def on_train_begin(self, trainer: Any, logs: dict | None = None) -> None:
        if trainer.global_step >= self.max_steps:
            trainer.stop_training = True

    def on_batch_end(self, batch_idx: int, trainer: Any, logs: dict | None = None) -> None:
        if trainer.global_step >= self.max_steps:
            trainer.stop_training = True


def max_steps_setup(args: argparse.Namespace) -> tuple[list[Callback], dict[str, Any]]:
    """The callbacks and Trainer options that ``--max-steps`` needs (none without it).

    ``stop_check_period=0`` makes the ranks agree on a stop after every step, so the run ends at
    step N or N+1 rather than up to 50 ms of steps later (the default period, see docs/callbacks.md).
    """
    if args.max_steps is None:
        return [], {}
    return [MaxSteps(args.max_steps)], {"stop_check_period": 0}


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
