"""What each per-step extra of anndist's loop costs, timed in isolation (run by hand).

    python tests/bench/peers/overhead_parts.py

Each figure is the minimum over repeats of the mean time per optimizer step (K=4 micro-batches),
which stays meaningful on a busy machine (contention only ever adds time). Parts, with where they live:
  * whole loop, 1 process: ``Trainer.fit`` against the hand-written loop on the small workload, same
    process, alternating; the difference is everything anndist adds without a process group;
  * non-finite check: ``OptimizerStep._scale_and_check`` every step (optimization.py), a fused kernel
    and one ``.item()`` (a host-device sync on CUDA);
  * loss sum: ``_run_batches`` adds each micro-batch's float32 loss to a float64 epoch sum (trainer.py);
  * batch helpers: ``split_batch``, two ``to_device``, ``batch_size`` per micro-batch (batch.py);
  * callback logs: three ``CallbackList.call`` per micro-batch, each with a fresh ``logs`` dict, even
    with no callback registered (trainer.py);
  * agreement: ``StopAgreement.propose`` after every step, an async MAX all-reduce (agreement.py), on 2
    gloo ranks next to a gradient-sized all-reduce per step.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]
import workload  # noqa: E402
from anndist import CallbackList, Trainer  # noqa: E402
from anndist.batch import batch_size, split_batch, to_device  # noqa: E402
from anndist.optimization import OptimizerStep  # noqa: E402
from anndist.precision import Precision  # noqa: E402
from anndist.agreement import StopAgreement  # noqa: E402

REPEATS = 7


def best_per_step(fn: Callable[[], int], repeats: int = REPEATS) -> float:
    """Minimum over repeats of seconds per step; ``fn`` runs some steps and returns how many."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        steps = fn()
        best = min(best, (time.perf_counter() - started) / steps)
    return best


def small_data(steps: int) -> TensorDataset:
    spec = workload.SIZES["small"]
    generator = torch.Generator().manual_seed(0)
    count = steps * workload.K * spec.batch
    return TensorDataset(torch.rand(count, spec.inputs, generator=generator),
                         torch.randint(0, spec.classes, (count,), generator=generator))


def handwritten_epoch(dataset: TensorDataset, steps: int) -> Callable[[], int]:
    model = workload.build_model("small")
    optimizer = workload.build_optimizer(model.parameters())
    criterion = nn.CrossEntropyLoss()
    loader = DataLoader(dataset, batch_size=workload.SIZES["small"].batch, shuffle=True)

    def run() -> int:
        for i, (inputs, targets) in enumerate(loader):
            (criterion(model(inputs), targets) / workload.K).backward()
            if (i + 1) % workload.K == 0:
                optimizer.step()
                optimizer.zero_grad()
        return steps
    return run


def anndist_epoch(dataset: TensorDataset, steps: int) -> Callable[[], int]:
    model = workload.build_model("small")
    trainer = Trainer(model, workload.build_optimizer(model.parameters()), nn.CrossEntropyLoss(),
                      gradient_accumulation_steps=workload.K, seed=workload.SEED)
    loader = DataLoader(dataset, batch_size=workload.SIZES["small"].batch, shuffle=True)

    def run() -> int:
        trainer.fit(loader, num_epochs=trainer.epoch + 1)
        return steps
    return run


def whole_loop() -> None:
    steps = 200
    dataset = small_data(steps)
    runs = {"hand-written": handwritten_epoch(dataset, steps), "anndist": anndist_epoch(dataset, steps)}
    best = {name: float("inf") for name in runs}
    for _ in range(REPEATS):  # alternate, so drift hits both alike
        for name, run in runs.items():
            best[name] = min(best[name], best_per_step(run, repeats=1))
    extra = best["anndist"] - best["hand-written"]
    print(f"whole loop, 1 process, small: hand-written {1e6 * best['hand-written']:.0f} us/step, anndist "
          f"{1e6 * best['anndist']:.0f} us/step: +{1e6 * extra:.0f} us ({best['anndist'] / best['hand-written']:.3f}x)")


def nonfinite_check() -> None:
    for size in ("small", "large"):
        model = workload.build_model(size)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer = workload.build_optimizer(model.parameters())
        step = OptimizerStep(optimizer, Precision(None, torch.device("cpu")), None, False, None, "error")

        def run() -> int:
            for _ in range(50):
                step._scale_and_check(1.0)
            return 50
        print(f"non-finite check, {size}: {1e6 * best_per_step(run):.1f} us/step")


def per_micro_batch_parts() -> None:
    spec = workload.SIZES["small"]
    batch = [torch.rand(spec.batch, spec.inputs), torch.randint(0, spec.classes, (spec.batch,))]
    device, loss = torch.device("cpu"), torch.tensor(2.3)
    total = torch.zeros((), dtype=torch.float64)
    callbacks = CallbackList([], rank=0)

    def loss_sum() -> int:
        for _ in range(1000 * workload.K):
            total.add_(loss, alpha=spec.batch)
        return 1000

    def helpers() -> int:
        for _ in range(1000 * workload.K):
            inputs, targets = split_batch(batch)
            batch_size(to_device(inputs, device), to_device(targets, device))
        return 1000

    def callback_logs() -> int:
        for i in range(1000 * workload.K):
            callbacks.call("on_batch_begin", i, trainer=None, logs={"epoch": 0})
            callbacks.call("on_backward_end", i, trainer=None, logs={"loss": loss, "ends_window": False})
            callbacks.call("on_batch_end", i, trainer=None,
                           logs={"loss": loss, "batch_size": 32, "ends_window": False, "stepped": False})
        return 1000
    parts = (("float64 loss sum", loss_sum), ("batch helpers", helpers), ("callback logs, no callbacks", callback_logs))
    for name, fn in parts:
        print(f"{name}, K={workload.K} micro-batches: {1e6 * best_per_step(fn):.1f} us/step")


def agreement_on_two_ranks(rank: int, world_size: int) -> dict[str, float]:
    """A step = the small model's forward/backward on K micro-batches + its gradient all-reduce."""
    import torch.distributed as dist
    model = workload.build_model("small")
    inputs = torch.rand(workload.SIZES["small"].batch, workload.SIZES["small"].inputs)
    gradients = torch.zeros(sum(p.numel() for p in model.parameters()))
    agreement = StopAgreement(torch.device("cpu"))

    def loop(with_agreement: bool) -> Callable[[], int]:
        def run() -> int:
            for _ in range(200):
                for _ in range(workload.K):
                    model(inputs).sum().backward()
                dist.all_reduce(gradients)
                if with_agreement:
                    agreement.propose(False)
            agreement.settle()
            return 200
        return run
    best = {"without": float("inf"), "with": float("inf")}
    for _ in range(REPEATS):
        for name, flag in (("without", False), ("with", True)):
            dist.barrier()
            best[name] = min(best[name], best_per_step(loop(flag), repeats=1))
    return best


def agreement() -> None:
    from spawn_ranks import run_spawn
    best = run_spawn(agreement_on_two_ranks, 2)[0]
    without, with_agreement = 1e6 * best["without"], 1e6 * best["with"]
    print(f"agreement, 2 gloo ranks, steps of small-model compute and one gradient all-reduce: "
          f"{without:.0f} -> {with_agreement:.0f} us/step (+{with_agreement - without:.0f} us)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    whole_loop()
    nonfinite_check()
    per_micro_batch_parts()
    agreement()
