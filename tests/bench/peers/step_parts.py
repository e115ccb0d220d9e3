"""What the hand-written loop's optimizer step is made of, part by part (run by hand).

    python tests/bench/peers/step_parts.py [--nprocs 2] [--reps 7] [--steps 100]

On the small workload (K=4) each rank times, per optimizer step, in isolation:
  * data: fetching K batches from the loader (``DataLoader`` + ``DistributedSampler``, no workers);
  * compute: K forward + loss + backward passes of the bare model on batches already fetched;
  * all-reduce: one all-reduce of a gradient-sized flat tensor (DDP's one bucket for this model);
  * optimizer: Adam's step and ``zero_grad``;
and then the whole hand-written step (tests/bench/peers/handwritten.py's loop). Every figure is the
minimum over ``--reps`` of the mean per step (contention only ever adds time), wall and process
CPU. The whole step minus the sum of its parts is what the loop loses between them: DDP's
bookkeeping (hooks, bucket copies in and out, ``no_sync``), waiting for the slower rank at the
all-reduce, and the Python between the calls.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[1]), str(HERE)]
import workload  # noqa: E402
from alternating import dataset, handwritten  # noqa: E402
from workload import K  # noqa: E402


def best(fn: Callable[[], int], reps: int) -> tuple[float, float]:
    """Minimum over ``reps`` of (wall, CPU) seconds per step; ``fn`` runs some steps, returns how many."""
    import torch.distributed as dist
    wall = cpu = float("inf")
    for _ in range(reps):
        if dist.is_initialized():
            dist.barrier()
        started, started_cpu = time.perf_counter(), time.process_time()
        steps = fn()
        wall = min(wall, (time.perf_counter() - started) / steps)
        cpu = min(cpu, (time.process_time() - started_cpu) / steps)
    return wall, cpu


def parts(rank: int, world_size: int, steps: int, reps: int) -> dict[str, tuple[float, float]]:
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler
    torch.set_num_threads(1)
    data = dataset(steps, world_size)
    sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=True, seed=workload.SEED)
    loader = DataLoader(data, batch_size=workload.SIZES["small"].batch, sampler=sampler)
    model = workload.build_model("small")
    optimizer = workload.build_optimizer(model.parameters())
    criterion = nn.CrossEntropyLoss()
    batches = list(itertools.islice(iter(loader), K))
    flat = torch.zeros(sum(p.numel() for p in model.parameters()))

    def data_only() -> int:
        for _ in loader:
            pass
        return steps

    def compute() -> int:
        for _ in range(steps):
            for inputs, targets in batches:
                (criterion(model(inputs), targets) / K).backward()
        return steps

    def all_reduce() -> int:
        for _ in range(steps):
            dist.all_reduce(flat)
        return steps

    def optimizer_step() -> int:
        for _ in range(steps):
            for p in model.parameters():
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
            optimizer.step()
            optimizer.zero_grad()
        return steps

    whole = handwritten(data, rank, world_size)

    def whole_step() -> int:
        whole()
        return steps
    timed = {"data": data_only, "compute": compute, "optimizer": optimizer_step}
    if dist.is_initialized():
        timed["all-reduce"] = all_reduce
    figures = {name: best(fn, reps) for name, fn in timed.items()}
    figures["whole step"] = best(whole_step, reps)
    return figures


def report(figures: dict[str, tuple[float, float]], nprocs: int, steps: int, reps: int) -> None:
    print(f"hand-written loop, small workload, K={K}, {nprocs} process(es), rank 0: minimum over {reps} runs of "
          f"{steps} steps, per optimizer step")
    print(f"{'part':12s} {'wall us':>9s} {'CPU us':>9s}")
    total = [0.0, 0.0]
    for name, (wall, cpu) in figures.items():
        if name == "whole step":
            continue
        total = [total[0] + wall, total[1] + cpu]
        print(f"{name:12s} {1e6 * wall:9.0f} {1e6 * cpu:9.0f}")
    whole = figures["whole step"]
    print(f"{'sum of parts':12s} {1e6 * total[0]:9.0f} {1e6 * total[1]:9.0f}")
    print(f"{'whole step':12s} {1e6 * whole[0]:9.0f} {1e6 * whole[1]:9.0f}")
    print(f"between the parts: {1e6 * (whole[0] - total[0]):.0f} us wall ({whole[0] / total[0]:.2f}x the sum), "
          f"{1e6 * (whole[1] - total[1]):.0f} us CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    if args.nprocs == 1:
        figures = parts(0, 1, args.steps, args.reps)
    else:
        from support import run_spawn
        figures = run_spawn(parts, args.nprocs, args.steps, args.reps)[0]
    report(figures, args.nprocs, args.steps, args.reps)


if __name__ == "__main__":
    main()
