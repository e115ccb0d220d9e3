"""Accumulation and precision on 2 ranks: time per sample with K=1 vs K=4, all-reduce rounds, fp32 vs bf16.

    python tests/bench/bench_accumulation.py [--steps 150] [--repeats 3]

Each configuration runs under `torchrun --standalone --nproc_per_node=2` on the digits example's
model (batch 32 per rank); configurations alternate over the repeats so drift cancels. Prints a
Markdown table of medians.
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
CONFIGS = [("fp32", 1), ("fp32", 4), ("bf16", 1), ("bf16", 4)]


def run_worker(precision: str, k: int, steps: int, out: str) -> None:
    import torch
    from torch import nn
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(ROOT / "launch"))
    from step_timer import StepTimer
    from train_digits import digits_datasets, digits_model

    from anndist import Trainer, seed_everything

    seed_everything(0)
    model = digits_model()
    timer = StepTimer(steps)
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-3), nn.CrossEntropyLoss(), callbacks=[timer],
                      gradient_accumulation_steps=k, use_amp=precision == "bf16", seed=0)
    rounds = []

    def counting_hook(state, bucket):
        if bucket.index() == 0:
            state.append(1)
        return allreduce_hook(None, bucket)

    trainer.model.register_comm_hook(rounds, counting_hook)
    train_set, _ = digits_datasets()
    trainer.fit(DataLoader(train_set, batch_size=32, shuffle=True), num_epochs=10_000)
    gaps = timer.gaps(10)  # warm-up excluded
    if trainer.is_main_process:
        Path(out).write_text(json.dumps({"step": statistics.median(gaps), "rounds": len(rounds) / trainer.global_step,
                                         "samples_per_step": 2 * 32 * k}))
    trainer.close()


def launch(precision: str, k: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        __file__, "--worker", precision, str(k), str(steps), out], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict = {c: [] for c in CONFIGS}
    for _ in range(args.repeats):
        for precision, k in CONFIGS:
            results[(precision, k)].append(launch(precision, k, args.steps))
    print(f"2 ranks (gloo, CPU), digits MLP 64-256-10, batch 32 per rank, {args.steps} steps, {args.repeats} repeats\n")
    print("| precision | K | step (ms) | per sample (us) | all-reduce rounds / step |")
    print("|---|---|---|---|---|")
    for precision, k in CONFIGS:
        runs = results[(precision, k)]
        step = statistics.median(r["step"] for r in runs)
        per_sample = step / runs[0]["samples_per_step"]
        print(f"| {precision} | {k} | {step * 1e3:.2f} | {per_sample * 1e6:.1f} | {runs[0]['rounds']:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        run_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
