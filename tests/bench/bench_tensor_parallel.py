"""Tensor-parallel layouts: the Trainer's optimizer step against a hand-written loop of the same layout (run by hand).

    OMP_NUM_THREADS=1 python tests/bench/bench_tensor_parallel.py --layout 2d [--reps 20] [--steps 30]

Layouts (``--layout``; ``all`` runs each in turn, each in its own spawned ranks):

- ``tp``: 2 ranks, tensor parallel only (1 x 2);
- ``2d``: 4 ranks, FSDP over "dp" x TP over "tp" (2 x 2), ``strategy="fsdp"``;
- ``tp_ddp``: 4 ranks, replicas over "dp" x TP (2 x 2), the default strategy;
- ``2d_ac``: ``2d`` with activation checkpointing of every block.

The model: an input layer, ``--blocks`` residual MLP blocks (``Linear(w, 4w) > GELU > Linear(4w, w)``,
split colwise/rowwise by the plan), a head; AdamW; K=2 micro-batches of ``--batch`` samples per data
shard. The hand-written loop makes the same calls the Trainer's strategy makes, and nothing else:
``init_device_mesh``, ``parallelize_module`` on "tp", (activation checkpointing of the same blocks,)
``fully_shard`` / FSDP2's ``replicate`` on "dp", then per window ``set_requires_gradient_sync``, forward,
``loss / K`` backward, ``step``, ``zero_grad``. Both are built once per process and run in turn,
A B A B ..., ``--reps`` epochs of ``--steps`` optimizer steps on the same per-rank batches; an optimizer
step hook reads the clocks, and the first ``WARMUP`` steps of each epoch are left out. Printed (rank 0):
wall, process CPU (all threads, gloo's included) and main-thread CPU per optimizer step, median and
[min-max] over repetitions, and the median of the per-repetition ratios Trainer / hand-written.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT), str(ROOT / "tests" / "bench" / "peers")]
from alternating import StepClock, print_runs  # noqa: E402  (the peers benchmark's clock and table)

WARMUP = 3
K = 2
LAYOUTS = {"tp": (2, "ddp", False), "2d": (4, "fsdp", False), "tp_ddp": (4, "ddp", False), "2d_ac": (4, "fsdp", True)}


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, width: int, blocks: int) -> None:
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


PLAN = {"blocks.*.fc1": "colwise", "blocks.*.fc2": "rowwise"}


def batches(steps: int, batch: int, data_rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(data_rank)
    return [(torch.randn(batch, 64, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(steps * K)]


def trainer_run(args, strategy: str, ac: bool):
    from anndist import Trainer
    torch.manual_seed(0)
    model = Net(args.width, args.blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    clock = StepClock(optimizer, WARMUP)
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), strategy=strategy, tp_size=2, tp_plan=PLAN,
                      activation_checkpointing=ac, gradient_accumulation_steps=K, seed=0, progress_bar=False)
    data = batches(args.steps, args.batch, trainer.strategy.data_rank)

    def run() -> dict[str, float]:
        trainer.fit(data, num_epochs=trainer.epoch + 1)
        return clock.per_step()
    run.close = trainer.close
    return run


def hand_run(args, strategy: str, ac: bool):
    """The same layout, written by hand with torch's calls."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.utils.checkpoint import checkpoint
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = Net(args.width, args.blocks)
    parallelize_module(model, mesh["tp"], {f"blocks.{i}.{fc}": style() for i in range(args.blocks)
                                           for fc, style in (("fc1", ColwiseParallel), ("fc2", RowwiseParallel))})
    if ac:
        for block in model.blocks:
            forward = block.forward
            block.forward = lambda *a, f=forward: checkpoint(f, *a, use_reentrant=False)
    wrapped = mesh["dp"].size() > 1
    if wrapped and strategy == "fsdp":
        fully_shard(model, mesh=mesh["dp"])
    elif wrapped:
        from torch.distributed._composable.replicate_with_fsdp import replicate
        replicate(model, mesh=mesh["dp"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    clock = StepClock(optimizer, WARMUP)
    data = batches(args.steps, args.batch, mesh["dp"].get_local_rank())
    criterion = nn.CrossEntropyLoss()

    def run() -> dict[str, float]:
        for i, (x, y) in enumerate(data):
            last = (i + 1) % K == 0
            if wrapped:
                model.set_requires_gradient_sync(last)
            (criterion(model(x), y) / K).backward()
            if last:
                optimizer.step()
                optimizer.zero_grad()
        return clock.per_step()
    run.close = lambda: None
    return run


def ranks_main(rank: int, world_size: int, args) -> dict[str, list[dict[str, float]]]:
    import torch.distributed as dist
    torch.set_num_threads(1)
    logging.getLogger("anndist").setLevel(logging.WARNING)
    _, strategy, ac = LAYOUTS[args.layout]
    runs = {"hand-written": hand_run(args, strategy, ac), "anndist": trainer_run(args, strategy, ac)}
    for run in runs.values():  # warm-up
        dist.barrier()
        run()
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for rep in range(args.reps):
        for name in (list(runs) if rep % 2 == 0 else list(reversed(runs))):
            dist.barrier()
            figures[name].append(runs[name]())
    return figures


def report(layout: str, figures: dict[str, list[dict[str, float]]], args) -> None:
    nprocs = LAYOUTS[layout][0]
    print(f"\nlayout {layout}: {nprocs} processes, {args.blocks} blocks of width {args.width}, K={K}, batch "
          f"{args.batch} per data shard, {args.reps} alternating repetitions of {args.steps} steps (rank 0)")
    print_runs(figures, "ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="all", choices=[*LAYOUTS, "all"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    from support import run_spawn
    for layout in (list(LAYOUTS) if args.layout == "all" else [args.layout]):
        args.layout = layout
        report(layout, run_spawn(ranks_main, LAYOUTS[layout][0], args)[0], args)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
