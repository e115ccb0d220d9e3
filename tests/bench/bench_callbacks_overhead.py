"""Cost of watching a run: the digits example's step time on 2 ranks with LoggingCallback and
ProfilingCallback (no trace) against no callbacks at all. Target: within 3%.

    python tests/bench/bench_callbacks_overhead.py [--reps 10] [--epochs 5]

Starts itself under torchrun (2 processes, gloo on CPU, or one GPU each). Every variant trains in
the same processes; the order of the variants rotates rep after rep so that machine drift cancels;
each fit builds a fresh Trainer and model from the same seed. Step time is measured inside epochs
(``on_epoch_begin`` to ``on_epoch_end`` of a probe listed first, over the optimizer steps taken),
so the once-per-fit work (opening the metrics file, gathering the profile table) is left out and
reported separately. Printed from rank 0: per variant, median wall and process-CPU ms per step,
time inside the per-batch hooks, once-per-fit ms; then the paired overheads against no callbacks.
Wall time is the target; on a shared machine it is noise-bound, and the CPU and in-hook figures
(much less sensitive to other load) say what the callbacks cost. Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PER_BATCH_HOOKS = ("on_batch_begin", "on_backward_end", "on_batch_end")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10, help="timed fits per variant")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per timed fit (23 steps each on 2 ranks)")
    parser.add_argument("--nproc", type=int, default=2)
    return parser.parse_args()


def launch(args: argparse.Namespace) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "launch")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           __file__, "--reps", str(args.reps), "--epochs", str(args.epochs)]
    sys.exit(subprocess.run(cmd, env=env).returncode)


def timed_fit(callbacks: list, epochs: int, loader) -> dict[str, float]:
    """ms per optimizer step inside epochs (wall, CPU, in per-batch hooks) and once-per-fit ms."""
    import torch
    from torch import nn

    from anndist import Callback, Trainer, seed_everything
    from train_digits import digits_model

    class EpochClock(Callback):
        wall = cpu = 0.0

        def on_epoch_begin(self, epoch, trainer, logs=None):
            self.started = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, trainer, logs=None):
            self.wall += time.perf_counter() - self.started[0]
            self.cpu += time.process_time() - self.started[1]

    seed_everything(0)
    model, clock = digits_model(), EpochClock()
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-3), nn.CrossEntropyLoss(),
                      callbacks=[clock, *callbacks], seed=0, progress_bar=False)
    in_hooks: dict[str, float] = {}
    call = trainer.callbacks.call

    def timed_call(hook, *args, **kwargs):
        entered = time.perf_counter()
        call(hook, *args, **kwargs)
        in_hooks[hook] = in_hooks.get(hook, 0.0) + time.perf_counter() - entered

    trainer.callbacks.call = timed_call
    fit_wall = time.perf_counter()
    trainer.fit(loader, num_epochs=epochs)
    fit_wall = time.perf_counter() - fit_wall
    per_step = 1e3 / trainer.global_step
    per_batch = sum(t for hook, t in in_hooks.items() if hook in PER_BATCH_HOOKS)
    return {"wall": clock.wall * per_step, "cpu": clock.cpu * per_step, "hooks": per_batch * per_step,
            "per_fit": (fit_wall - clock.wall) * 1e3}


def worker(args: argparse.Namespace) -> None:
    from torch.utils.data import DataLoader

    from anndist import LoggingCallback, ProfilingCallback
    from anndist.log import configure, set_console_stream
    from train_digits import digits_datasets

    train_set, _ = digits_datasets()
    loader = DataLoader(train_set, batch_size=32, shuffle=True)
    log_dir = tempfile.mkdtemp(prefix="anndist-bench-")
    logger = configure(int(os.environ.get("RANK", 0)))
    variants = {
        "none": lambda: [],
        "logging": lambda: [LoggingCallback(log_interval=10, log_dir=log_dir)],
        "profiling": lambda: [ProfilingCallback()],
        "logging+profiling": lambda: [LoggingCallback(log_interval=10, log_dir=log_dir), ProfilingCallback()],
    }
    names = list(variants)
    console = set_console_stream(open(os.devnull, "w"))  # the lines are formatted and written, not shown
    for name in names:  # warm-up: first-fit costs (allocator, threads, gloo buffers)
        timed_fit(variants[name](), 1, loader)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            runs[name].append(timed_fit(variants[name](), args.epochs, loader))
    if console is not None:
        set_console_stream(console)
    report(logger, runs, args)


def report(logger, runs: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    logger.info("digits example, %s ranks, %d reps x %d epochs per variant (rotating order); "
                "ms per optimizer step unless noted:", os.environ.get("WORLD_SIZE", "1"), args.reps, args.epochs)
    median = lambda values: statistics.median(values)  # noqa: E731
    for name, fits in runs.items():
        wall = [f["wall"] for f in fits]
        logger.info("  %-18s wall %.3f (min %.3f, max %.3f) | cpu %.3f | in batch hooks %.4f | once per fit %.1f ms",
                    name, median(wall), min(wall), max(wall), median(f["cpu"] for f in fits),
                    median(f["hooks"] for f in fits), median(f["per_fit"] for f in fits))
    base = runs["none"]
    for name in list(runs)[1:]:
        wall = median(w["wall"] / b["wall"] - 1 for w, b in zip(runs[name], base))
        cpu = median(w["cpu"] / b["cpu"] - 1 for w, b in zip(runs[name], base))
        best = min(w["wall"] for w in runs[name]) / min(b["wall"] for b in base) - 1
        hooks = median(w["hooks"] - b["hooks"] for w, b in zip(runs[name], base))
        logger.info("  %-18s vs none: wall %+.1f%% (paired median), %+.1f%% (fastest reps) | cpu %+.1f%% | "
                    "hooks add %.1f us/step", name, 100 * wall, 100 * best, 100 * cpu, 1e3 * hooks)
    logger.info("%s", "  target: logging+profiling within 3% of none (wall)")


if __name__ == "__main__":
    arguments = parse_args()
    if "RANK" in os.environ:
        worker(arguments)
    else:
        launch(arguments)
