"""Peak memory per rank of each layout, with and without activation checkpointing, on CPU ranks (run by hand).

    OMP_NUM_THREADS=1 python tests/bench/bench_parallel_memory.py [--width 512] [--blocks 6] [--tokens 2048]

One configuration at a time, each in fresh spawned processes (gloo, a FileStore), so each peak is its own:
one process, DDP on 4, FSDP on 4, TP on 2 (1 x 2), 2-D on 4 (FSDP x TP, 2 x 2), TP with replicas on 4,
and the same with ``activation_checkpointing=True``. The model: ``--blocks`` residual MLP blocks
(``Linear(w, 4w) > GELU > Linear(4w, w)``, the TP plan splits them colwise/rowwise) on inputs of
``--tokens`` rows per data shard (a batch of sequences, flattened), AdamW, K=1, 3 optimizer steps.
Per rank: the process's peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) above its RSS before
the model was built, and the model state it holds after the last step (parameters and AdamW's two
moments, the rank's local parts); printed as a Markdown table with the largest rank's figures. The
ranks run with ``MALLOC_MMAP_THRESHOLD_=65536`` (unless set): glibc then returns freed large blocks,
so the peak reflects the memory in use. Every rank also builds the whole model before it is split,
which counts in the peak when it exceeds the training step's own.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "bench"), str(ROOT / "tests"), str(ROOT)]
from bench_tensor_parallel import PLAN, Net  # noqa: E402

MiB = 2**20
CONFIGS = [  # name, processes, Trainer options
    ("one process", 1, {}),
    ("DDP", 4, {}),
    ("FSDP", 4, {"strategy": "fsdp"}),
    ("TP 1x2", 2, {"tp_size": 2, "tp_plan": PLAN}),
    ("TP + replicas 2x2", 4, {"tp_size": 2, "tp_plan": PLAN}),
    ("2-D FSDP x TP 2x2", 4, {"strategy": "fsdp", "tp_size": 2, "tp_plan": PLAN}),
]


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def local_bytes(tensors) -> int:
    from anndist.strategies.dtensor import local
    return sum(local(t).numel() * local(t).element_size() for t in tensors if isinstance(t, torch.Tensor))


def one_config(rank: int, world_size: int, options: dict, args) -> dict:
    from anndist import Trainer
    import torch.distributed.checkpoint.state_dict  # noqa: F401  what the Trainer imports on first use,
    import torch.distributed.fsdp  # noqa: F401                    loaded before the baseline
    import torch.distributed.tensor.parallel  # noqa: F401
    torch.set_num_threads(1)
    before = rss()
    torch.manual_seed(0)
    model = Net(args.width, args.blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), progress_bar=False, handle_signals=False, **options)
    g = torch.Generator().manual_seed(trainer.strategy.data_rank)
    data = [(torch.randn(args.tokens, 64, generator=g), torch.randint(0, 10, (args.tokens,), generator=g))
            for _ in range(3)]
    trainer.fit(data, num_epochs=1)
    state = local_bytes(trainer.module.parameters()) + local_bytes(
        v for s in optimizer.state.values() for v in s.values() if v.dim())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak": peak - before, "state": state}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    from support import run_spawn
    params = sum(p.numel() for p in Net(args.width, args.blocks).parameters())
    print(f"{args.blocks} blocks of width {args.width} ({params / 1e6:.1f}M parameters), {args.tokens} rows per "
          "data shard, AdamW, 3 steps; per rank, the largest: peak RSS above the RSS before the model, model state")
    print("| layout | ranks | peak MiB | with activation checkpointing | model state MiB |")
    print("|---|---|---|---|---|")
    for name, nprocs, options in CONFIGS:
        row = []
        for ac in (False, True):
            results = run_spawn(one_config, nprocs, {**options, "activation_checkpointing": ac}, args)
            row.append(results)
        peak = max(r["peak"] for r in row[0]) / MiB
        peak_ac = max(r["peak"] for r in row[1]) / MiB
        state = max(r["state"] for r in row[0]) / MiB
        print(f"| {name} | {nprocs} | {peak:.0f} | {peak_ac:.0f} | {state:.0f} |", flush=True)


if __name__ == "__main__":
    main()
