"""How long a DDP checkpoint holds training up: a synchronous save (one file) against an asynchronous one
(``async_checkpoint=True``: a DCP folder written in the background).

On 2 spawned gloo ranks (CPU), for models of a few sizes (four width x width layers, AdamW stepped once
so it holds two moments per weight), median of ``--repeats`` saves of each kind, taken in turns:

    sync save      trainer.save_in_dir(...) with async_checkpoint=False: the time it blocks training
                   (rank 0 writes and fsyncs the file, every rank waits at the barrier)
    async blocked  the same call with async_checkpoint=True (trainer.run_state.sharded.last_blocked_s):
                   run file, DCP's planning of the state and the copy of the state into CPU memory
    async written  from the start of that call until the folder is committed in the background

Run by hand (never by CI), on a quiet machine, on the disk you train on:

    python tests/bench/bench_async_checkpoint.py [--sizes 2 25] [--repeats 3] [--dir PATH]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from anndist import Trainer  # noqa: E402
from support import run_spawn  # noqa: E402


def make_trainer(million_params: float, async_save: bool) -> Trainer:
    width = int((million_params * 1e6 / 4) ** 0.5)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), nn.MSELoss(), seed=0,
                      async_checkpoint=async_save, progress_bar=False, handle_signals=False)
    x = torch.randn(8, width)
    trainer.fit([(x, x)], num_epochs=1)  # one step: AdamW's moments exist
    return trainer


def _ranks(rank: int, world_size: int, million_params: float, folder: str, repeats: int) -> dict:
    sync, asynchronous = make_trainer(million_params, False), make_trainer(million_params, True)
    times: dict[str, list[float]] = {"sync save": [], "async blocked": [], "async written": []}
    for i in range(repeats):
        os.sync()
        start = time.perf_counter()
        sync.save_in_dir(f"{folder}/sync", name=f"s{i}")
        times["sync save"].append(time.perf_counter() - start)
        os.sync()
        start = time.perf_counter()
        asynchronous.save_in_dir(f"{folder}/async", name=f"a{i}")
        times["async blocked"].append(asynchronous.run_state.sharded.last_blocked_s)
        asynchronous.run_state.sharded.wait()  # what the next save would wait for, if it came this soon
        times["async written"].append(time.perf_counter() - start)
    params = sum(p.numel() for p in sync.module.parameters()) / 1e6
    sizes = {kind: sum(f.stat().st_size for f in Path(folder, kind).rglob("*") if f.is_file()) / repeats / 1e6
             for kind in ("sync", "async")}
    sync.close()
    asynchronous.close()
    return {"params": params, "sizes": sizes, **{name: statistics.median(v) for name, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[2, 25], help="model sizes in millions of parameters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="folder to write in (default: a temporary folder here)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir or ".") as folder:
        print(f"2 ranks (gloo, CPU), writing in {Path(folder).resolve()}; median of {args.repeats}")
        for i, size in enumerate(args.sizes):
            out = run_spawn(_ranks, 2, size, f"{folder}/{i}", args.repeats)
            print(f"{out[0]['params']:6.1f}M params, {out[0]['sizes']['sync']:7.1f} MB a save "
                  f"({out[0]['sizes']['async']:.1f} MB as a DCP folder):", flush=True)
            for name in ("sync save", "async blocked", "async written"):
                print(f"    {name:14s} " + "  ".join(f"rank {r}: {o[name] * 1e3:8.1f} ms" for r, o in enumerate(out)),
                      flush=True)


if __name__ == "__main__":
    main()
