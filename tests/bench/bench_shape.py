"""What the global batch and the loss-spike guard cost per optimizer step, against the same run without them.

    python tests/bench/bench_shape.py [--nprocs 1,2] [--steps 200] [--repeats 5]

One ``torchrun --standalone`` per process count; inside it the configurations alternate over the repeats
(each a fresh Trainer on the digits example's model, batch 32 per rank, K=4), so drift cancels:

- ``K=4``: ``gradient_accumulation_steps=4`` (the reference);
- ``global``: ``global_batch_size=128 * W`` (the same K), whose forward is reseeded per micro-batch;
- ``guard loss`` / ``guard grad_norm``: ``K=4`` with ``spike_guard=SpikeGuard(watch=...)``.

Prints a Markdown table: median ms per optimizer step (steps 20 onwards), and the ratio to ``K=4``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["K=4", "global", "guard loss", "guard grad_norm"]


def worker(steps: int, repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(ROOT / "launch"))
    from step_timer import StepTimer
    from train_digits import digits_datasets, digits_model

    from anndist import SpikeGuard, Trainer, seed_everything

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # the group outlives the Trainers built on it
        dist.init_process_group("gloo")

    options = {"K=4": {"gradient_accumulation_steps": 4}, "global": {"global_batch_size": 128 * world},
               "guard loss": {"gradient_accumulation_steps": 4, "spike_guard": SpikeGuard(watch="loss")},
               "guard grad_norm": {"gradient_accumulation_steps": 4, "spike_guard": SpikeGuard(watch="grad_norm")}}
    train_set, _ = digits_datasets()
    medians: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(repeats):
        for name in CONFIGS:
            seed_everything(0)
            model = digits_model()
            timer = StepTimer(steps)
            trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-3), nn.CrossEntropyLoss(),
                              callbacks=[timer], seed=0, progress_bar=False, handle_signals=False, stop_check_period=0.25,
                              **options[name])
            trainer.fit(DataLoader(train_set, batch_size=32, shuffle=True), num_epochs=10_000)
            trainer.close()
            gaps = timer.gaps(19)
            medians[name].append(statistics.median(gaps) * 1e3)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(medians))
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nprocs", default="1,2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.repeats, args.worker)
        return
    print("| procs | configuration | ms per step (median of repeats) | range | x K=4 |")
    print("|---|---|---|---|---|")
    for nprocs in map(int, args.nprocs.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "out.json")
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}",
                            __file__, "--steps", str(args.steps), "--repeats", str(args.repeats), "--worker", out],
                           cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
            medians = json.loads(Path(out).read_text())
        base = statistics.median(medians["K=4"])
        for name in CONFIGS:
            values = medians[name]
            print(f"| {nprocs} | {name} | {statistics.median(values):.3f} | {min(values):.3f}-{max(values):.3f} | "
                  f"{statistics.median(values) / base:.3f} |")


if __name__ == "__main__":
    main()
