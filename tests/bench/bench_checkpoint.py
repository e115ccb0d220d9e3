"""How long a checkpoint stalls training, against a plain ``torch.save`` of the same state.

For models of a few sizes (an MLP trained one step with AdamW, so the optimizer holds two moments per
weight), times, median of ``--repeats`` runs:

    torch.save        torch.save(payload, path) over the previous file: the same dict save_checkpoint
                      writes, no fsync (the kernel writes the data back later)
    torch.save+fsync  the same, then fsync: what durability alone costs on this disk
    new file+fsync    torch.save to a new file, fsync, delete the previous file: the file system work
                      that any atomic write needs (a new file each time; freeing the old one)
    save_checkpoint   trainer.save_checkpoint(path): state assembly, RNG gather, temp file, fsync,
                      the weights_only safety check, os.replace, fsync of the folder
    load_checkpoint   trainer.load_checkpoint(path): CRC-32 check, weights_only load and restore
    load, unchecked   the same with the CRC-32 check skipped: what loads cost before the check
    crc check         the CRC-32 check of every record alone (part of every read_checkpoint)
    read mmap=True    read_checkpoint(path, mmap=True): what latest_checkpoint does per file (check + map)
    torch.save no crc torch.save with torch's CRC-32 computation off: what the CRCs cost at save time

Run by hand (never by CI), on a quiet machine, on the disk you train on:

    python tests/bench/bench_checkpoint.py [--sizes 1 25] [--repeats 5] [--dir PATH]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from anndist import Trainer  # noqa: E402
from anndist.checkpoint import file as checkpoint_file  # noqa: E402
from anndist.checkpoint.file import damaged_record, read_checkpoint  # noqa: E402
from anndist.checkpoint.payload import build  # noqa: E402


def make_trainer(million_params: float) -> Trainer:
    width = int((million_params * 1e6 / 4) ** 0.5)  # four width x width layers
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), nn.MSELoss(), seed=0)
    x = torch.randn(8, width)
    trainer.fit([(x, x)], num_epochs=1)  # one step: AdamW's moments exist
    return trainer


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function; taken in turns so that a busy moment hits all of them alike.

    ``os.sync()`` (not timed) before each call: otherwise a save without fsync leaves its data dirty
    and the next fsync, of whichever method comes next, pays for writing it (ext4 data=ordered).
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            os.sync()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def plain_save(payload: dict, path: Path, fsync: bool) -> None:
    torch.save(payload, path)  # what most training scripts do
    if fsync:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def load_unchecked(trainer: Trainer, path: Path) -> None:
    checkpoint_file.damaged_record = lambda path: None
    try:
        trainer.load_checkpoint(path)
    finally:
        checkpoint_file.damaged_record = damaged_record


def save_without_crc(payload: dict, path: Path) -> None:
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(payload, path)
    finally:
        torch.serialization.set_crc32_options(True)


def fresh_save(payload: dict, folder: Path, counter: list[int]) -> None:
    """torch.save to a new file, fsync, delete the previous one: the file work any atomic write does."""
    counter[0] += 1
    plain_save(payload, folder / f"fresh{counter[0]}.pt", fsync=True)
    (folder / f"fresh{counter[0] - 1}.pt").unlink(missing_ok=True)


def bench(million_params: float, folder: Path, repeats: int) -> None:
    trainer = make_trainer(million_params)
    run = trainer.run_state
    payload = build({name: obj.state_dict() for name, obj in run.states.items()},
                    [{name: obj.state_dict() for name, obj in run.rank_states.items()}], {})
    path = folder / "bench.ckpt"
    trainer.save_checkpoint(path)  # every method then replaces or deletes a file of the same size
    counter = [0]
    figures = timed({
        "torch.save": lambda: plain_save(payload, folder / "plain.pt", fsync=False),
        "torch.save+fsync": lambda: plain_save(payload, folder / "plain.pt", fsync=True),
        "new file+fsync": lambda: fresh_save(payload, folder, counter),
        "save_checkpoint": lambda: trainer.save_checkpoint(path),
        "load_checkpoint": lambda: trainer.load_checkpoint(path),
        "load, unchecked": lambda: load_unchecked(trainer, path),
        "crc check": lambda: damaged_record(path),
        "read mmap=True": lambda: read_checkpoint(path, mmap=True),
        "torch.save no crc": lambda: save_without_crc(payload, folder / "plain.pt"),
    }, repeats)
    size_mb = path.stat().st_size / 1e6
    params = sum(p.numel() for p in trainer.module.parameters()) / 1e6
    base = figures["torch.save"]
    print(f"{params:6.1f}M params, {size_mb:7.1f} MB file:", flush=True)
    for name, seconds in figures.items():
        print(f"    {name:17s} {seconds * 1e3:9.1f} ms  {seconds / base:5.2f}x", flush=True)
    trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 25], help="model sizes in millions of parameters")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="folder to write in (default: a temporary folder here)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    with tempfile.TemporaryDirectory(dir=args.dir or ".") as folder:
        print(f"writing in {Path(folder).resolve()}; median of {args.repeats}; ratios against torch.save")
        for size in args.sizes:
            bench(size, Path(folder), args.repeats)


if __name__ == "__main__":
    main()
