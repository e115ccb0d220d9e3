"""The cost of the Trainer's loss paths against hand-written loops running the same loss (run by hand).

    python tests/bench/bench_compute_loss.py [--model mlp|gpt2] [--steps 60] [--rounds 5]

Four runners train the same model (same initial weights) on the same data (the same per-rank order)
for ``--steps`` optimizer steps of K micro-batches each:

- ``anndist compute_loss``: ``Trainer(model, opt, compute_loss=fn)``, fn returning ``(mean, items)``;
- ``hand compute_loss``: a DDP loop calling the same fn: ``(mean * items).backward()`` under
  ``no_sync`` but on the window's last micro-batch, all-reduce of the window's item count, gradients
  times ``world / total``, step (what anndist's exact item-weighted accumulation computes);
- ``anndist criterion`` / ``hand criterion``: ``Trainer(model, opt, criterion)`` against the classic
  loop (``criterion(ddp(x), y) / K``), as tests/bench/peers/handwritten.py does.

Models: ``mlp`` is the digits-sized MLP of tests/bench/peers/workload.py (64-256-10, batch 32, K=4;
overhead-bound, where a framework's per-step cost shows); ``gpt2`` is launch/train_gpt2.py's model
and data (batch 8, K=2; token-weighted, needs transformers). Each world size (torchrun with 2 gloo
ranks, then one plain process) is one launch in which the runners alternate for ``--rounds`` rounds,
each run a fresh model and optimizer, the order flipped every round so drift cancels. A run's figure
is rank 0's median time between optimizer steps (the first 3 left out), in wall and in process CPU
time; the table shows the median over runs with the spread in brackets (max - min over runs, as %
of the median), and anndist / hand of the medians. ``same weights`` counts the rounds in which both
runners of a path ended with bit-identical weights.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
WARMUP = 3
RUNNERS = [("compute_loss", "anndist"), ("compute_loss", "hand"), ("criterion", "anndist"), ("criterion", "hand")]


# ----------------------------------------------------------------------------- workloads
def mlp_workload(world: int, steps: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    sys.path.insert(0, str(ROOT / "tests" / "bench" / "peers"))
    import workload

    k, batch = workload.K, workload.SIZES["small"].batch
    g = torch.Generator().manual_seed(0)
    n = steps * k * batch * world
    data = TensorDataset(torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g))

    def compute_loss(model, b):
        x, y = b
        return F.cross_entropy(model(x), y, reduction="sum") / len(y), len(y)

    return {"k": k, "batch": batch, "dataset": data, "collate": None, "build": lambda: workload.build_model("small"),
            "compute_loss": compute_loss, "criterion": torch.nn.CrossEntropyLoss(), "forward": lambda m, x: m(x)}


def gpt2_workload(world: int, steps: int) -> dict[str, Any]:
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "launch"))
    from train_gpt2 import IGNORE, gpt2_model, lm_datasets, pad_batch, token_loss

    k, batch = 2, 8
    vocab, data, _ = lm_datasets(train_count=steps * k * batch * world)

    def as_criterion_batch(samples):  # {"inputs": model keywords, "targets": labels}
        b = pad_batch(samples)
        return {"inputs": {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, "targets": b["labels"]}

    def criterion(output, labels):  # the mean over this micro-batch's tokens
        return F.cross_entropy(output.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)

    return {"k": k, "batch": batch, "dataset": data, "collate": pad_batch, "criterion_collate": as_criterion_batch,
            "build": lambda: gpt2_model(len(vocab), seed=1234), "compute_loss": token_loss, "criterion": criterion,
            "forward": lambda m, inputs: m(**inputs)}


WORKLOADS: dict[str, Callable[[int, int], dict[str, Any]]] = {"mlp": mlp_workload, "gpt2": gpt2_workload}


# ----------------------------------------------------------------------------- one run
class StepClock:
    """Wall and CPU time at the end of every optimizer step, whoever calls ``step``."""

    def __init__(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def result(self) -> dict[str, float]:
        self.handle.remove()
        gaps = lambda t: [b - a for a, b in zip(t, t[1:])][WARMUP:]  # noqa: E731
        return {"wall": statistics.median(gaps(self.wall)), "cpu": statistics.median(gaps(self.cpu))}


def run_once(w: dict[str, Any], path: str, runner: str, rank: int, world: int, seed: int) -> tuple[dict, Any]:
    import torch
    from torch.utils.data import DataLoader

    from anndist import Trainer, seed_everything

    seed_everything(seed)
    model = w["build"]()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    collate = w.get("criterion_collate", w["collate"]) if path == "criterion" else w["collate"]
    clock = StepClock()
    if runner == "anndist":
        loss = {"compute_loss": w["compute_loss"]} if path == "compute_loss" else {"criterion": w["criterion"]}
        trainer = Trainer(model, optimizer, gradient_accumulation_steps=w["k"], seed=seed, progress_bar=False, **loss)
        trainer.fit(DataLoader(w["dataset"], batch_size=w["batch"], shuffle=True, collate_fn=collate), num_epochs=1)
        trainer.close()  # drops DDP; the group is this script's
    else:
        hand_loop(w, path, model, optimizer, collate, rank, world, seed)
    return clock.result(), torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def hand_loop(w: dict[str, Any], path: str, model, optimizer, collate, rank: int, world: int, seed: int) -> None:
    """The hand-written DDP loop of ``path``, reading the Trainer's per-rank order (DistributedSampler)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler

    from anndist import seed_everything

    ddp = DDP(model) if world > 1 else model
    seed_everything(seed + rank)  # each rank's own stream (dropout), as the Trainer reseeds
    sampler = DistributedSampler(w["dataset"], num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(0)
    k = w["k"]
    ddp.train()
    items = 0
    # Its own generator: a loader without one draws its base seed from the global stream (dropout's).
    loader = DataLoader(w["dataset"], batch_size=w["batch"], sampler=sampler, collate_fn=collate,
                        generator=torch.Generator())
    for i, batch in enumerate(loader):
        ends_window = (i + 1) % k == 0
        with contextlib.nullcontext() if ends_window or ddp is model else ddp.no_sync():
            if path == "compute_loss":
                loss, n = w["compute_loss"](ddp, batch)
                (loss * n).backward()
                items += n
            else:
                inputs, targets = batch if isinstance(batch, (tuple, list)) else (batch["inputs"], batch["targets"])
                (w["criterion"](w["forward"](ddp, inputs), targets) / k).backward()
        if not ends_window:
            continue
        if path == "compute_loss":
            total = torch.as_tensor(items, dtype=torch.float64).reshape(1).clone()
            if world > 1:
                dist.all_reduce(total)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(world / total.item())
            items = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run_worker(model_name: str, steps: int, rounds: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    w = WORKLOADS[model_name](world, steps)
    results: dict[str, list] = {f"{p} {r}": [] for p, r in RUNNERS}
    same: dict[str, list[bool]] = {p: [] for p, _ in RUNNERS}
    for round_ in range(rounds):
        weights = {}
        for path, runner in RUNNERS if round_ % 2 == 0 else RUNNERS[::-1]:
            timing, weights[(path, runner)] = run_once(w, path, runner, rank, world, seed=1234)
            results[f"{path} {runner}"].append(timing)
        for path in same:
            same[path].append(torch.equal(weights[(path, "anndist")], weights[(path, "hand")]))
    if rank == 0:
        Path(out).write_text(json.dumps({"runs": results, "same": same}))
    if world > 1:
        import gc
        gc.collect()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- driver
def launch(model_name: str, world: int, steps: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
                if world > 1 else [sys.executable])
        subprocess.run([*head, __file__, "--worker", model_name, str(steps), str(rounds), out], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(Path(out).read_text())


def summary(runs: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in runs]
    median = statistics.median(values)
    return median, (max(values) - min(values)) / median * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="mlp")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (the first 3 are not timed)")
    parser.add_argument("--rounds", type=int, default=5, help="runs per runner, alternating")
    args = parser.parse_args()
    if args.steps <= WARMUP + 1:
        parser.error(f"--steps must be > {WARMUP + 1}")
    print(f"model {args.model}, {args.steps} optimizer steps per run, {args.rounds} runs per runner, CPU gloo, "
          "rank 0's median time per optimizer step, median over runs (spread: (max - min) / median)\n")
    print("| ranks | path | wall ms/step anndist | hand | anndist/hand | CPU ms/step anndist | hand | anndist/hand "
          "| same weights |")
    print("|---|---|---|---|---|---|---|---|---|")
    for world in (2, 1):
        result = launch(args.model, world, args.steps, args.rounds)
        for path in ("compute_loss", "criterion"):
            row = [str(world), path]
            for key in ("wall", "cpu"):
                (ours, our_spread), (hand, hand_spread) = (summary(result["runs"][f"{path} {runner}"], key)
                                                           for runner in ("anndist", "hand"))
                row += [f"{ours * 1e3:.2f} ({our_spread:.0f}%)", f"{hand * 1e3:.2f} ({hand_spread:.0f}%)",
                        f"{ours / hand:.3f}"]
            row.append(f"{sum(result['same'][path])}/{len(result['same'][path])}")
            print("| " + " | ".join(row) + " |")

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        run_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
