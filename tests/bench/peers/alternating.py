"""anndist and the hand-written DDP loop taking turns inside the same processes (run by hand).

    python tests/bench/peers/alternating.py --nprocs 2 --reps 30 --steps 100

compare_peers.py starts a fresh torchrun per run, so each figure carries a process start's noise
(placement, page cache, the other load of the moment). Here each rank builds both loops once, on
the same process group, and runs them in turn, A B A B ..., ``--reps`` epochs of ``--steps``
optimizer steps each (small workload, K=4, defaults on: signal handling, stop agreement, logging):
the two see the same machine at nearly the same moment. A clock on each optimizer's step hook
times the steady state: from the end of step ``WARMUP`` to the end of the last step of the epoch,
so the per-epoch costs (``fit``'s setup, the epoch's loss reduction and log line) stay out. Printed
per runner, rank 0: wall, process CPU (every thread, gloo's included) and main-thread CPU per
optimizer step, median and [min-max] over repetitions, and the median of the per-repetition ratios
anndist / hand-written. ``--own-cost`` gives the hand-written loop anndist's DDP options and batched
reads (like with like: the Trainer's own work alone); without it the loop is written as people do.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset, default_collate

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[1]), str(HERE)]
import workload  # noqa: E402
from workload import K  # noqa: E402

CLOCKS = ("wall", "cpu", "thread")
WARMUP = 5  # steps of each epoch left out: the loader's first batches, the first buckets


class StepClock:
    """The three clocks read at the end of every optimizer step (an optimizer step hook)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int = WARMUP) -> None:
        self.ends: list[tuple[float, float, float]] = []
        self.warmup = warmup
        optimizer.register_step_post_hook(lambda *_: self.ends.append(
            (time.perf_counter(), time.process_time(), time.thread_time())))

    def per_step(self) -> dict[str, float]:
        """Seconds per step of the steady part of the epoch just run (after ``warmup`` steps), per clock;
        then start afresh."""
        ends, self.ends = self.ends, []
        first, last = ends[self.warmup - 1], ends[-1]
        return {clock: (b - a) / (len(ends) - self.warmup) for clock, a, b in zip(CLOCKS, first, last)}


def dataset(steps: int, world_size: int, size: str = "small") -> TensorDataset:
    spec = workload.SIZES[size]
    count = steps * K * spec.batch * world_size
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(count, spec.inputs, generator=generator),
                         torch.randint(0, spec.classes, (count,), generator=generator))


def handwritten(data: TensorDataset, rank: int, world_size: int, own_cost: bool) -> Callable[[], None]:
    """tests/bench/peers/handwritten.py's loop, one epoch per call, with its step clock."""
    model = workload.build_model("small")
    optimizer = workload.build_optimizer(model.parameters())
    clock = StepClock(optimizer)
    run = handwritten_epochs(model, optimizer, data, rank, world_size, own_cost=own_cost)
    run.clock, run.optimizer = clock, optimizer  # type: ignore[attr-defined]
    return run


def like_anndist(own_cost: bool) -> dict:
    """The hand-written loop's DDP keywords: DDP's defaults, or anndist's with ``own_cost``."""
    from anndist.strategies.ddp import DDP_DEFAULTS
    return DDP_DEFAULTS if own_cost else {}


def reading(data: TensorDataset, batch_size: int, sampler: DistributedSampler, own_cost: bool) -> DataLoader:
    """The hand-written loop's loader: sample by sample as people write it, or with ``own_cost``
    through anndist's batched reads (batched_reads.py), as the Trainer's rebuilt loader reads."""
    from anndist.data.batched_reads import batched_reads
    dataset, collate_fn = batched_reads(data, default_collate) if own_cost else (data, None)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn)


def handwritten_epochs(model: nn.Module, optimizer: torch.optim.Optimizer, data: TensorDataset, rank: int,
                       world_size: int, size: str = "small", own_cost: bool = False) -> Callable[[], None]:
    """The hand-written loop on ``model`` and ``optimizer``, one epoch per call (``own_cost``: with
    anndist's DDP options and batched reads)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp = DDP(model, **like_anndist(own_cost)) if dist.is_initialized() else model
    criterion = nn.CrossEntropyLoss()
    sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=True, seed=workload.SEED)
    loader = reading(data, workload.SIZES[size].batch, sampler, own_cost)
    epoch = [0]

    def run() -> None:
        sampler.set_epoch(epoch[0])
        epoch[0] += 1
        ddp.train()
        hand_epoch(ddp, model, optimizer, criterion, loader)
    return run


def hand_epoch(ddp: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
               loader: DataLoader, before_step: Callable[[], None] | None = None) -> torch.Tensor:
    """One epoch of tests/bench/peers/handwritten.py's loop (``ddp`` is ``model`` in one process);
    ``before_step()`` runs before each optimizer step. Returns the last micro-batch's loss."""
    for i, (inputs, targets) in enumerate(loader):
        ends_window = (i + 1) % K == 0
        with contextlib.nullcontext() if ends_window or ddp is model else ddp.no_sync():
            loss = criterion(ddp(inputs), targets) / K
            loss.backward()
        if ends_window:
            if before_step is not None:
                before_step()
            optimizer.step()
            optimizer.zero_grad()
    return loss


def anndist_loop(data: TensorDataset, rank: int, world_size: int) -> Callable[[], None]:
    """The Trainer as the README shows it, one epoch per call (``fit`` to the next epoch)."""
    from anndist import Trainer
    model = workload.build_model("small")
    optimizer = workload.build_optimizer(model.parameters())
    clock = StepClock(optimizer)
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), gradient_accumulation_steps=K, seed=workload.SEED)
    loader = DataLoader(data, batch_size=workload.SIZES["small"].batch, shuffle=True)

    def run() -> None:
        trainer.fit(loader, num_epochs=trainer.epoch + 1)
    run.trainer, run.clock, run.optimizer = trainer, clock, optimizer  # type: ignore[attr-defined]
    return run


def measure(run: Callable[[], None]) -> dict[str, float]:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
    run()
    return run.clock.per_step()  # type: ignore[attr-defined]


def ranks_main(rank: int, world_size: int, steps: int, reps: int,
               own_cost: bool = False) -> dict[str, list[dict[str, float]]]:
    import logging
    torch.set_num_threads(1)
    logging.getLogger("anndist").setLevel(logging.WARNING)  # the epoch lines would print every repetition
    data = dataset(steps, world_size)
    runs = {"hand-written": handwritten(data, rank, world_size, own_cost), "anndist": anndist_loop(data, rank, world_size)}
    for run in runs.values():  # warm-up: first-call costs (allocator, imports, DDP's first buckets)
        measure(run)
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for rep in range(reps):
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))
        for name in order:
            figures[name].append(measure(runs[name]))
    runs["anndist"].trainer.close()  # type: ignore[attr-defined]
    return figures


def report(figures: dict[str, list[dict[str, float]]], nprocs: int, steps: int) -> None:
    print(f"small workload, K={K}, {nprocs} process(es), {len(figures['anndist'])} alternating repetitions of "
          f"{steps} optimizer steps (rank 0)")
    print_runs(figures, "us")


def print_runs(figures: dict[str, list[dict[str, float]]], unit: str) -> None:
    """Each runner's median [min-max] per optimizer step on every clock (``unit`` "us" or "ms"), then the
    median [min-max] of the per-repetition ratios anndist / hand-written."""
    scale, digits = {"us": (1e6, 0), "ms": (1e3, 2)}[unit]
    print(f"{'runner':14s}" + "".join(f"{clock + ' ' + unit + '/step':>28s}" for clock in CLOCKS))
    for name, reps in figures.items():
        cells = []
        for clock in CLOCKS:
            values = [scale * r[clock] for r in reps]
            cells.append(f"{statistics.median(values):8.{digits}f} [{min(values):6.{digits}f}-{max(values):6.{digits}f}]")
        print(f"{name:14s}" + "".join(f"{c:>28s}" for c in cells))
    ratios = {clock: [a[clock] / h[clock] for a, h in zip(figures["anndist"], figures["hand-written"])]
              for clock in CLOCKS}
    print("anndist / hand-written, median [min-max] of the per-repetition ratios: " + ", ".join(
        f"{clock} {statistics.median(r):.3f}x [{min(r):.2f}-{max(r):.2f}]" for clock, r in ratios.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--own-cost", action="store_true",
                        help="the hand-written loop with anndist's DDP options and batched reads (interleaved.py)")
    args = parser.parse_args()
    if args.nprocs == 1:
        figures = ranks_main(0, 1, args.steps, args.reps, args.own_cost)
    else:
        from support import run_spawn
        figures = run_spawn(ranks_main, args.nprocs, args.steps, args.reps, args.own_cost)[0]
    report(figures, args.nprocs, args.steps)


if __name__ == "__main__":
    main()
