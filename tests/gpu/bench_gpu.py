"""Step time on one GPU: anndist's Trainer against a hand-written loop, same model, data and optimizer.

    python tests/gpu/bench_gpu.py [--device cuda:0] [--reps 5] [--json OUT]

The workloads are those of tests/bench/peers/workload.py: "small" (the digits MLP, overhead-bound)
and "large" (three 2048-wide layers, compute-bound), Adam, K=4 micro-batches per optimizer step, in
fp32 and bf16 autocast. The hand-written loop is tests/bench/peers/handwritten.py in one process on
the device (no DDP), with ``non_blocking`` copies from pinned memory like the Trainer's. The two run
alternately ``--reps`` times; each run times its steps after a warm-up, from a device synchronize to
a device synchronize, and the figure is the median over the runs of the time per optimizer step.
``--device cpu`` is a dry run of the harness (figures meaningless on a shared CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "bench" / "peers"), str(ROOT)]
import workload  # noqa: E402
from workload import K, SIZES  # noqa: E402

from anndist import Trainer  # noqa: E402


class Clock:
    """Synchronizes and reads the time after the ``warmup``-th optimizer step and at the end."""

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup, self.steps, self.start = device, warmup, 0, None
        self._handle = register_optimizer_step_post_hook(self._hook)

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _hook(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            self.start = self._sync()

    def ms_per_step(self) -> float:
        end = self._sync()
        self._handle.remove()
        return (end - self.start) * 1e3 / (self.steps - self.warmup)


def dataset(size: str, steps: int) -> TensorDataset:
    spec = SIZES[size]
    g = torch.Generator().manual_seed(workload.SEED)
    n = steps * K * spec.batch
    return TensorDataset(torch.randn(n, spec.inputs, generator=g), torch.randint(0, spec.classes, (n,), generator=g))


def loader(data: TensorDataset, size: str, device: torch.device) -> DataLoader:
    return DataLoader(data, batch_size=SIZES[size].batch, pin_memory=device.type == "cuda")


def handwritten(size: str, data: TensorDataset, device: torch.device, amp: bool, warmup: int) -> float:
    model = workload.build_model(size).to(device)
    optimizer = workload.build_optimizer(model.parameters())
    criterion = nn.CrossEntropyLoss()
    clock = Clock(device, warmup)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    model.train()
    for i, (inputs, targets) in enumerate(loader(data, size, device)):
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast():
            loss = criterion(model(inputs), targets) / K
        loss.backward()
        if (i + 1) % K == 0:
            optimizer.step()
            optimizer.zero_grad()
    return clock.ms_per_step()


def with_anndist(size: str, data: TensorDataset, device: torch.device, amp: bool, warmup: int) -> float:
    model = workload.build_model(size)
    optimizer = workload.build_optimizer(model.parameters())
    amp_options = {"use_amp": True, "amp_dtype": "bf16"} if amp else {}
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), device=device, gradient_accumulation_steps=K,
                      seed=workload.SEED, progress_bar=False, handle_signals=False, **amp_options)
    clock = Clock(trainer.device, warmup)
    trainer.fit(loader(data, size, trainer.device), num_epochs=1)
    ms = clock.ms_per_step()
    trainer.close()
    return ms


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per run (default: per size)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for size, default_steps in (("small", 300), ("large", 150)):
        steps = args.steps or default_steps
        warmup = max(2, steps // 5)
        data = dataset(size, steps)
        for amp in (False, True):
            times: dict[str, list[float]] = {"handwritten": [], "anndist": []}
            for _ in range(args.reps):  # alternating, so drift (clocks, other load) hits both alike
                times["handwritten"].append(handwritten(size, data, device, amp, warmup))
                times["anndist"].append(with_anndist(size, data, device, amp, warmup))
            hand, ours = (statistics.median(times[k]) for k in ("handwritten", "anndist"))
            rows.append({"size": size, "precision": "bf16" if amp else "fp32", "steps": steps - warmup,
                         "reps": args.reps, "handwritten_ms": hand, "anndist_ms": ours,
                         "overhead_pct": 100 * (ours / hand - 1), "runs_ms": times})
            print(f"{size:5} {'bf16' if amp else 'fp32'}  hand-written {hand:8.3f} ms/step  anndist "
                  f"{ours:8.3f} ms/step  ({100 * (ours / hand - 1):+.1f}%)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "name": _device_name(device),
                                               "torch": torch.__version__, "rows": rows}, indent=1))
    return rows


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    main()
