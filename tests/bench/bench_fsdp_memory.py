"""FSDP vs DDP memory on 2 CPU ranks: the bytes of model state each rank holds after one Adam step.

    OMP_NUM_THREADS=1 python tests/bench/bench_fsdp_memory.py [--width 1024] [--blocks 5] [--world-size 2]
                                                              [--malloc-default]

A stack of MLP blocks (``Linear(w, 4w) > GELU > Linear(4w, w)``; 42M fp32 parameters by default) is
trained for one optimizer step (Adam, batch 8 per rank) by the Trainer with ``strategy="ddp"`` and
then ``strategy="fsdp"`` (each ``Linear`` its own shard group), each in a fresh set of processes
(spawn, gloo, a FileStore), so each strategy's RSS is its own. Per rank it reports, from
``ProfilingCallback``'s ``model_state`` (``anndist/memory.py``: ``numel() * element_size()`` of the
tensors the rank holds, ``DTensor.to_local()`` under FSDP): parameters and Adam's state after the
step, gradients after the step's backward (before the step sets them to None); and the process's
RSS before the model is built, after the step, and its peak. Prints a Markdown table and the FSDP/DDP
ratios (ideal: 1/world size). The RSS includes torch itself and, at the peak, the whole model each
rank builds before it is sharded. The ranks run with ``MALLOC_MMAP_THRESHOLD_=65536`` (unless it is
set, or ``--malloc-default``): glibc then serves large blocks with mmap and returns them when freed, so RSS follows the memory
in use; with its default sliding threshold, FSDP's freed all-gather buffers stay in the heap and RSS
after the step hardly differs between the strategies.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]  # this checkout's anndist, and support (run_spawn)

import torch  # noqa: E402
from torch import nn  # noqa: E402

MiB = 2**20


def mlp_stack(width: int, blocks: int) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
              for _ in range(blocks)]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_step(rank: int, world_size: int, strategy: str, width: int, blocks: int) -> dict:
    """One Adam step under ``strategy``; this rank's model state, RSS and step time."""
    from torch.utils.data import DataLoader, TensorDataset

    from anndist import Callback, ProfilingCallback, Trainer

    at_start = current_rss()

    class Rss(Callback):
        def on_batch_end(self, batch_idx, trainer, logs=None):
            self.after_step = current_rss()

    model = mlp_stack(width, blocks)
    params = sum(p.numel() for p in model.parameters())
    options = {"shard_modules": lambda m: isinstance(m, nn.Linear)} if strategy == "fsdp" else {}
    profile, rss = ProfilingCallback(), Rss()
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-4), nn.CrossEntropyLoss(),
                      strategy=strategy, callbacks=[profile, rss], seed=0, progress_bar=False,
                      handle_signals=False, **options)
    g, n = torch.Generator().manual_seed(0), 8 * world_size
    data = TensorDataset(torch.randn(n, width, generator=g), torch.randint(0, 10, (n,), generator=g))
    trainer.fit(DataLoader(data, batch_size=8), max_steps=1)
    state = profile.summaries[rank]["model_state"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"params": params, "state": state, "rss_start": at_start, "rss": rss.after_step, "peak_rss": peak}


def measure(strategy: str, world_size: int, width: int, blocks: int) -> list[dict]:
    from support import run_spawn
    return run_spawn(one_step, world_size, strategy, width, blocks)


def table(results: dict[str, list[dict]]) -> str:
    columns = ["strategy", "rank", "parameters", "gradients", "Adam state", "total", "RSS at start",
               "RSS after step", "peak RSS"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for strategy, ranks in results.items():
        for rank, r in enumerate(ranks):
            s = r["state"]
            cells = [s["parameters"], s["gradients"], s["optimizer"], sum(s.values()), r["rss_start"], r["rss"],
                     r["peak_rss"]]
            lines.append(f"| {strategy} | {rank} | " + " | ".join(f"{c / MiB:.1f} MiB" for c in cells) + " |")
    return "\n".join(lines)


def ratios(results: dict[str, list[dict]]) -> str:
    lines = []
    for rank, (ddp, fsdp) in enumerate(zip(results["ddp"], results["fsdp"])):
        parts = {kind: fsdp["state"][kind] / ddp["state"][kind] for kind in ddp["state"]}
        total = sum(fsdp["state"].values()) / sum(ddp["state"].values())
        lines.append(f"rank {rank}: FSDP/DDP model state {total:.3f} (parameters {parts['parameters']:.3f}, "
                     f"gradients {parts['gradients']:.3f}, Adam {parts['optimizer']:.3f}); "
                     f"RSS after step {fsdp['rss'] / ddp['rss']:.3f}, its growth from the start "
                     f"{(fsdp['rss'] - fsdp['rss_start']) / (ddp['rss'] - ddp['rss_start']):.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--malloc-default", action="store_true", help="leave glibc's mmap threshold sliding")
    args = parser.parse_args()
    if not args.malloc_default:
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # read by the ranks' glibc: see the docstring
    started = time.perf_counter()
    results = {strategy: measure(strategy, args.world_size, args.width, args.blocks) for strategy in ("ddp", "fsdp")}
    params = results["ddp"][0]["params"]
    print(f"{params / 1e6:.1f}M fp32 parameters ({params * 4 / MiB:.0f} MiB), Adam, {args.world_size} ranks "
          f"(gloo, CPU), torch {torch.__version__}; one optimizer step per strategy; "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}")
    print(table(results))
    print(ratios(results) + f"\nideal: {1 / args.world_size:.3f}; ran in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
