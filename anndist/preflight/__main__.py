"""``python -m anndist.preflight [options] [ENTRY [ARGS...]]``: check the nodes before training.

Start it as training is started, on every rank (``torchrun ... -m anndist.preflight train.py ...``,
``srun python -m anndist.preflight train.py ...``, or the Slurm scripts with ``PREFLIGHT=1``). Rank 0
prints one table and names the ranks and hosts that fail or lag; ``--strict`` makes every rank exit 1
then. ENTRY is the training script (its SHA-256 must agree on every rank); a ``--checkpoint-dir DIR``
among its ARGS is the folder checked, unless ``--checkpoint-dir`` is given here.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from datetime import timedelta

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from ..dist import process_group
from ..dist.device import default_device
from ..dist.env import detect_env
from ..dist.lagging import SLOW_BELOW, check_fraction
from .run import ROUND_S, ROUNDS, run_preflight

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m anndist.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", default=None, help="the checkpoint folder to check (default: ARGS')")
    parser.add_argument("--checkpoint-size", default=None, type=parse_size,
                        help="room a checkpoint needs, e.g. 20G (default: free space shown, not judged)")
    parser.add_argument("--strict", action="store_true", help="exit 1 on every rank when a rank fails or lags")
    parser.add_argument("--threshold", type=float, default=SLOW_BELOW,
                        help="a rank slower than this times the median of the other ranks lags")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="compute rounds (each --round-seconds long)")
    parser.add_argument("--round-seconds", type=float, default=ROUND_S)
    parser.add_argument("--backend", default=None, help="process group backend (default: nccl on GPUs, gloo)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a collective may wait for a rank")
    parser.add_argument("entry", nargs="?", default=None, help="the training script")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = parser.parse_args(argv)
    try:
        check_fraction("--threshold", args.threshold)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    if args.rounds < 1 or args.round_seconds <= 0:
        parser.error(f"--rounds={args.rounds} and --round-seconds={args.round_seconds} must be positive")
    if args.checkpoint_dir is None:
        args.checkpoint_dir = checkpoint_dir_in(args.args)
    return args


def parse_size(text: str) -> int:
    """``"20G"``, ``"512MiB"``, ``"1.5T"``, ``"1000"`` (bytes) -> bytes."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"--checkpoint-size={text!r} is not a size such as 20G, 512M or 1000000")
    number, unit = match.groups()
    return int(float(number) * 1024 ** "_kmgt".index(unit.lower() or "_"))


def checkpoint_dir_in(args: list[str]) -> str | None:
    """The value of ``--checkpoint-dir`` / ``--checkpoint_dir`` in the training script's arguments."""
    for i, arg in enumerate(args):
        for name in ("--checkpoint-dir", "--checkpoint_dir"):
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


@record
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = detect_env(os.environ)
    device = default_device(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = args.backend or process_group.default_backend(device)
    process_group.init_process_group(env, backend, timedelta(seconds=args.timeout))
    try:
        result = run_preflight(device, args.entry, args.checkpoint_dir, args.checkpoint_size, args.threshold,
                               args.rounds, args.round_seconds)
        if result.report:
            print(result.report, flush=True)
    finally:
        process_group.teardown()
    return 1 if args.strict and not result.passed else 0


if __name__ == "__main__":
    sys.exit(main())
