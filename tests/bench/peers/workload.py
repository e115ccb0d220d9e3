"""The one workload every runner trains, and the measurement every runner shares.

Same model and initial weights (``build_model`` seeds before building), same data order per rank
(``DistributedSampler(shuffle=True, seed=SEED)``, epoch 0), same optimizer (Adam, ``LR``), K=4
micro-batches per optimizer step, a fixed number of optimizer steps (the driver writes a dataset
of exactly ``steps * K * batch * world_size`` samples, so one epoch is exactly ``steps`` windows).

Measurement is identical for every runner by construction: a global optimizer step post-hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``) timestamps the end of each optimizer
step, whichever library calls ``step``. Counting collectives (``--audit``) is done in separate runs,
because a Python comm hook and wrapped collectives would slow the timed runs down.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

K = 4            # micro-batches per optimizer step (gradient accumulation)
SEED = 1234      # initial weights and the data order
LR = 1e-3


@dataclass(frozen=True)
class Size:
    inputs: int
    hidden: tuple[int, ...]
    classes: int
    batch: int   # per rank


SIZES = {
    # Overhead-bound: the digits classifier of launch/train_digits.py (without dropout).
    "small": Size(inputs=64, hidden=(256,), classes=10, batch=32),
    # Compute-bound: three 2048-wide hidden layers on synthetic data.
    "large": Size(inputs=512, hidden=(2048, 2048, 2048), classes=10, batch=64),
}


def build_model(size: str) -> nn.Sequential:
    """The size's MLP with the same initial weights in every runner and on every rank."""
    spec = SIZES[size]
    torch.manual_seed(SEED)
    widths = (spec.inputs, *spec.hidden)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths, widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], spec.classes))
    return nn.Sequential(*layers)


def compiled(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """``torch.compile(model)`` with ``--compile`` (the bare module, before any DDP wrapper), else ``model``."""
    return torch.compile(model) if args.compile else model


def build_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=LR)


def load_dataset(path: str) -> TensorDataset:
    data = torch.load(path, weights_only=True)
    return TensorDataset(data["x"], data["y"])


def rank_sampler(dataset: TensorDataset, rank: int, world_size: int) -> DistributedSampler:
    """This rank's data order: the order every runner must reproduce."""
    return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=SEED)


class InterleavedBatches:
    """A global batch order whose every ``world_size``-th batch is one rank's ``rank_sampler`` batch.

    Accelerate's ``prepare`` shards a loader by handing rank r the global batches r, r+W, r+2W, ...;
    fed this order, each rank reads exactly the batches of ``rank_sampler``.
    """

    def __init__(self, dataset: TensorDataset, world_size: int, batch: int) -> None:
        per_rank = [list(rank_sampler(dataset, r, world_size)) for r in range(world_size)]
        self.batches = [shard[i:i + batch] for i in range(0, len(per_rank[0]), batch) for shard in per_rank]
        self.batch_size = batch

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# --------------------------------------------------------------------------- measurement
class StepClock:
    """Timestamps the end of every optimizer step of the process (any optimizer, any library)."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []  # process CPU time: steadier than wall time on a shared machine
        self.first_step_wall: float | None = None
        self.marks: list[Any] = []  # callables run at the first and last step (the audit's counters)
        self.steps_expected = 0
        register_optimizer_step_post_hook(self._hook)

    def _hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        if self.first_step_wall is None:
            self.first_step_wall = time.time()
        if len(self.ends) in (1, self.steps_expected):
            for mark in self.marks:
                mark()


class Audit:
    """Counts gradient all-reduce rounds (a DDP comm hook) and every other collective (wrapped c10d calls).

    Counters are read at the first and the last optimizer step, so the per-step figures cover the
    steady state only (no setup broadcasts, no teardown barriers).
    """

    COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                   "reduce", "gather", "scatter", "barrier", "all_to_all", "all_to_all_single")

    def __init__(self, clock: StepClock, steps: int) -> None:
        self.buckets = 0
        self.rounds = 0
        self.other: dict[str, int] = {}
        self.snapshots: list[tuple[int, int, dict[str, int]]] = []
        self.window_steps = max(steps - 1, 1)  # steps between the first and the last snapshot
        self._all_reduce = dist.distributed_c10d.all_reduce  # the hook's own, uncounted as "other"
        clock.marks.append(self._snapshot)
        for name in self.COLLECTIVES:
            self._wrap(name)

    def _wrap(self, name: str) -> None:
        c10d = dist.distributed_c10d
        original = getattr(c10d, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.other[name] = self.other.get(name, 0) + 1
            return original(*args, **kwargs)

        setattr(c10d, name, counted)  # calls made inside c10d (e.g. by broadcast_object_list)
        setattr(dist, name, counted)  # calls made as torch.distributed.<name>

    def hook(self, state, bucket):  # no annotations: DDP checks them, and this module's are strings
        """A DDP comm hook: the default all-reduce, counted. ``is_last`` closes one round."""
        self.buckets += 1
        self.rounds += bucket.is_last()
        tensor = bucket.buffer().div_(dist.get_world_size())  # what DDP's built-in all-reduce does
        future = self._all_reduce(tensor, async_op=True).get_future()
        return future.then(lambda fut: fut.value()[0])

    def register(self, ddp_model: Any) -> None:
        ddp_model.register_comm_hook(None, self.hook)

    def _snapshot(self) -> None:
        self.snapshots.append((self.rounds, self.buckets, dict(self.other)))

    def per_step(self) -> dict[str, Any]:
        if len(self.snapshots) < 2:
            return {}
        (r0, b0, o0), (r1, b1, o1) = self.snapshots[0], self.snapshots[-1]
        steps = self.window_steps
        other = {name: (o1[name] - o0.get(name, 0)) / steps for name in o1 if o1[name] != o0.get(name, 0)}
        return {"rounds": (r1 - r0) / steps, "buckets": (b1 - b0) / steps, "other": other,
                "rounds_total": self.rounds, "buckets_total": self.buckets}


# --------------------------------------------------------------------------- runner plumbing
def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--data", required=True, help="dataset file written by compare_peers.py")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps (one epoch)")
    parser.add_argument("--out", required=True, help="result prefix; rank r writes PREFIX.rank{r}.json/.pt")
    parser.add_argument("--audit", action="store_true", help="count collectives (slower; not for timing)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (each runner its way)")
    return parser.parse_args()


def start(args: argparse.Namespace) -> tuple[StepClock, Audit | None]:
    """Install the step clock (and the audit) before training starts."""
    clock = StepClock()
    clock.steps_expected = args.steps
    audit = Audit(clock, args.steps) if args.audit else None
    return clock, audit


def finish(args: argparse.Namespace, clock: StepClock, model: nn.Module, audit: Audit | None,
           **extra: Any) -> None:
    """Write this rank's timestamps, counts and final weights."""
    rank = int(os.environ.get("RANK", 0))
    weights = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    torch.save(weights, f"{args.out}.rank{rank}.pt")
    result = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", 1)),
              "step_ends": clock.ends, "cpu_ends": clock.cpu_ends,
              "first_step_wall": clock.first_step_wall, "finished_wall": time.time(),
              "audit": audit.per_step() if audit is not None else None, **extra}
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(result))


def destroy_process_group() -> None:
    """The exit recipe for gloo on torch 2.13: collect (the DDP wrappers are dropped), destroy, collect."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
