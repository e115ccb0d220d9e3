"""anndist and the hand-written DDP loop taking turns step by step inside the same processes (run by hand).

    python tests/bench/peers/interleaved.py --nprocs 1 --steps 1000 --epochs 3
    python tests/bench/peers/interleaved.py --nprocs 1 --steps 1000 --epochs 3 --calibrate
    python tests/bench/peers/interleaved.py --nprocs 2 --size large --steps 50 --epochs 2
    python tests/bench/peers/interleaved.py --nprocs 2 --steps 500 --epochs 3 --own-cost

alternating.py takes turns epoch by epoch, so the speed this VM drifts by over a second (±15-30%)
still lands on one runner or the other, and a 2% difference needs thousands of epochs to show. Here
the turns are ``--turn`` optimizer steps long (default one): right after every ``--turn``-th optimizer
step of ``Trainer.fit`` (from the optimizer's step hook), as many optimizer steps of the hand-written
loop run (K micro-batches each, its own model, optimizer and data, the same workload), so A H A H ...;
each side's turn is one unbroken stretch that starts right after the other side's. Clocks (wall,
process CPU of every thread, main-thread CPU) are read around the hand-written turn, so:

    hand-written turn j  =  from its start to its end (zero_grad included),
    anndist turn i       =  from the end of hand-written turn i-1 to anndist's last optimizer step
                            of turn i (its zero_grad of the step before included, as the hand-written one's).

Printed per clock, rank 0: the median and interquartile range of each side's time per step over
every turn of ``--epochs`` epochs (after a warm-up epoch), and the median of the per-turn ratios
anndist / hand-written with a 95% interval of that median (binomial order statistics).
``--calibrate`` runs the hand-written loop in anndist's place: an unbiased method reads 1.000x
(measured 0.995-1.001x at 1 process, 0.987-0.995x at 2).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[1]), str(HERE)]
import workload  # noqa: E402
from alternating import CLOCKS, dataset, handwritten_epochs, like_anndist, reading  # noqa: E402
from workload import K  # noqa: E402


def clocks() -> tuple[float, float, float]:
    return time.perf_counter(), time.process_time(), time.thread_time()


class HandSteps:
    """tests/bench/peers/handwritten.py's loop, one optimizer step (K micro-batches) per ``step()``."""

    def __init__(self, data: TensorDataset, rank: int, world_size: int, size: str, own_cost: bool) -> None:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.model = workload.build_model(size)
        self.ddp = DDP(self.model, **like_anndist(own_cost)) if dist.is_initialized() else self.model
        self.optimizer = workload.build_optimizer(self.model.parameters())
        self.criterion = nn.CrossEntropyLoss()
        self.sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=True, seed=workload.SEED)
        self.loader = reading(data, workload.SIZES[size].batch, self.sampler, own_cost)
        self.epoch, self.batches = 0, iter(())
        self.intervals: list[tuple[tuple[float, ...], tuple[float, ...]]] = []

    def step(self) -> None:
        started = clocks()
        ddp, model = self.ddp, self.model
        for i in range(K):
            inputs, targets = self._next()
            ends_window = i == K - 1
            with contextlib.nullcontext() if ends_window or ddp is model else ddp.no_sync():
                loss = self.criterion(ddp(inputs), targets) / K
                loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.intervals.append((started, clocks()))

    def _next(self) -> Any:
        try:
            return next(self.batches)
        except StopIteration:
            self.sampler.set_epoch(self.epoch)
            self.epoch += 1
            self.batches = iter(self.loader)
            return next(self.batches)


def ranks_main(rank: int, world_size: int, steps: int, epochs: int, turn: int = 1,
               calibrate: bool = False, size: str = "small",
               own_cost: bool = False) -> dict[str, list[tuple[float, ...]]]:
    import logging
    from anndist import Trainer
    torch.set_num_threads(1)
    logging.getLogger("anndist").setLevel(logging.WARNING)
    data = dataset(steps, world_size, size)
    hand = HandSteps(data, rank, world_size, size, own_cost)
    model = workload.build_model(size)
    optimizer = workload.build_optimizer(model.parameters())
    ends: list[tuple[float, ...]] = []  # the end of each of anndist's turns

    def take_turn(*_: Any) -> None:
        ends.append(clocks())
        if len(ends) % turn == 0:
            for _ in range(turn):
                hand.step()

    optimizer.register_step_post_hook(take_turn)
    if calibrate:  # A/A: the hand-written loop in anndist's place; the method's own bias shows as != 1
        run_epoch, close = handwritten_epochs(model, optimizer, data, rank, world_size, size, own_cost), lambda: None
    else:
        trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), gradient_accumulation_steps=K, seed=workload.SEED)
        loader = DataLoader(data, batch_size=workload.SIZES[size].batch, shuffle=True)
        run_epoch, close = lambda: trainer.fit(loader, num_epochs=trainer.epoch + 1), trainer.close
    figures: dict[str, list[tuple[float, ...]]] = {"anndist": [], "hand-written": []}
    for epoch in range(epochs + 1):  # epoch 0 warms up
        ends.clear()
        hand.intervals.clear()
        run_epoch()
        if epoch:
            add_epoch(figures, ends[turn - 1::turn], hand.intervals, turn)
    close()
    return figures


def add_epoch(figures: dict[str, list[tuple[float, ...]]], ends: list[tuple[float, ...]],
              intervals: list[tuple[tuple[float, ...], tuple[float, ...]]], turn: int) -> None:
    """Pair anndist's turn i (from the end of the hand-written turn i-1 to the end of its own turn i)
    with the hand-written turn i; each as time per optimizer step (``turn`` steps per turn)."""
    turns = [(intervals[i][0], intervals[i + turn - 1][1]) for i in range(0, len(intervals), turn)]
    assert len(turns) == len(ends), (len(turns), len(ends))
    for (_, previous_stop), end, (start, stop) in zip(turns, ends[1:], turns[1:]):
        figures["hand-written"].append(tuple((b - a) / turn for a, b in zip(start, stop)))
        figures["anndist"].append(tuple((b - a) / turn for a, b in zip(previous_stop, end)))


def median_interval(values: list[float]) -> tuple[float, float]:
    """A 95% interval of the median of ``values`` (order statistics n/2 -+ 1.96 sqrt(n)/2)."""
    ordered, n = sorted(values), len(values)
    half = 1.96 * math.sqrt(n) / 2
    return ordered[max(0, int(n / 2 - half))], ordered[min(n - 1, int(math.ceil(n / 2 + half)))]


def report(figures: dict[str, list[tuple[float, ...]]], nprocs: int, steps: int, epochs: int, turn: int,
           size: str) -> None:
    count = len(figures["anndist"])
    print(f"{size} workload, K={K}, {nprocs} process(es), {count} pairs of turns of {turn} optimizer step(s) "
          f"({epochs} epochs of {steps} steps) (rank 0)")
    print(f"{'runner':14s}" + "".join(f"{clock + ' us/step, median [IQR]':>34s}" for clock in CLOCKS))
    for name, steps_ in figures.items():
        cells = []
        for c, clock in enumerate(CLOCKS):
            values = sorted(1e6 * s[c] for s in steps_)
            q1, q3 = values[len(values) // 4], values[3 * len(values) // 4]
            cells.append(f"{statistics.median(values):8.0f} [{q1:6.0f}-{q3:6.0f}]")
        print(f"{name:14s}" + "".join(f"{cell:>34s}" for cell in cells))
    parts = [f"{clock} {median:.3f}x [{low:.3f}-{high:.3f}]" for clock, (median, low, high) in ratios(figures).items()]
    print("anndist / hand-written, median of the per-turn ratios [95% interval]: " + ", ".join(parts))


def ratios(figures: dict[str, list[tuple[float, ...]]]) -> dict[str, tuple[float, float, float]]:
    """Per clock: the median of the per-turn ratios anndist / hand-written and its 95% interval."""
    out = {}
    for c, clock in enumerate(CLOCKS):
        values = [a[c] / h[c] for a, h in zip(figures["anndist"], figures["hand-written"]) if h[c] > 0]
        out[clock] = (statistics.median(values), *median_interval(values))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs (after one warm-up epoch)")
    parser.add_argument("--turn", type=int, default=1, help="optimizer steps per turn")
    parser.add_argument("--size", choices=sorted(workload.SIZES), default="small")
    parser.add_argument("--own-cost", action="store_true",
                        help="the hand-written loop with what anndist does for it: its DDP_DEFAULTS (gradients as "
                             "bucket views) and its batched reads of a TensorDataset; anndist's own cost alone")
    parser.add_argument("--calibrate", action="store_true",
                        help="A/A: the hand-written loop in anndist's place (the method's bias; expect 1.000x)")
    args = parser.parse_args()
    if args.nprocs == 1:
        figures = ranks_main(0, 1, args.steps, args.epochs, args.turn, args.calibrate, args.size, args.own_cost)
    else:
        from support import run_spawn
        figures = run_spawn(ranks_main, args.nprocs, args.steps, args.epochs, args.turn, args.calibrate, args.size,
                            args.own_cost)[0]
    report(figures, args.nprocs, args.steps, args.epochs, args.turn, args.size)


if __name__ == "__main__":
    main()
