"""What the checks of a sharded (DCP) checkpoint folder cost (``anndist/checkpoint/integrity.py``).

One process, ``strategy="fsdp"`` (so every save is a DCP folder), an MLP trained one step with AdamW
(weights and two moments saved); median of ``--repeats`` runs taken in turns, files in the page cache:

    load, checked     trainer.load_checkpoint(folder): index checksum, shard sizes, keys and shapes,
                      every item's CRC-32 as DCP reads it, then the restore
    load, unchecked   the same load through DCP's own FileSystemReader, with none of the checks
    pick (latest)     read_run_file(folder): what latest_checkpoint pays per folder (run.ckpt's CRC,
                      the index against its checksum, a stat per shard): no shard is read
    item CRCs alone   the CRC-32 check of every item, over bytes already in memory

Run by hand, on a quiet machine:

    python tests/bench/bench_dcp_checks.py [--sizes 1 25] [--repeats 5] [--dir PATH]
"""
from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from anndist import Trainer  # noqa: E402
from anndist.checkpoint import integrity  # noqa: E402
from anndist.checkpoint.file import damaged_archive  # noqa: E402
from anndist.checkpoint.sharded import read_run_file  # noqa: E402


def make_trainer(million_params: float) -> Trainer:
    width = int((million_params * 1e6 / 4) ** 0.5)  # four width x width layers
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), nn.MSELoss(), seed=0, strategy="fsdp",
                      progress_bar=False, handle_signals=False)
    x = torch.randn(8, width)
    trainer.fit([(x, x)], num_epochs=1)
    return trainer


def unchecked(trainer: Trainer, folder: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader
    with mock.patch.object(integrity, "checked_reader", lambda path, index: FileSystemReader(path)), \
            mock.patch.object(integrity, "check_fits", lambda *args: None), \
            mock.patch.object(integrity, "read_index", lambda path: pickle.loads((path / ".metadata").read_bytes())):
        trainer.load_checkpoint(folder)


def item_crcs(folder: Path):
    index = pickle.loads((folder / ".metadata").read_bytes())
    files = {name: (folder / name).read_bytes() for name in {i.relative_path for i in index.storage_data.values()}}
    items = [files[i.relative_path][i.offset:i.offset + i.length] for i in index.storage_data.values()]
    return lambda: [damaged_archive(item) for item in items]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 25])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    print(f"{'params':>8} {'folder':>8} | {'load checked':>13} {'load unchecked':>15} {'pick (latest)':>14} "
          f"{'item CRCs':>10}")
    for size in args.sizes:
        trainer = make_trainer(size)
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            folder = trainer.save_checkpoint(Path(tmp) / "c.ckpt")
            mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
            fns = {"checked": lambda: trainer.load_checkpoint(folder), "unchecked": lambda: unchecked(trainer, folder),
                   "pick": lambda: read_run_file(folder, mmap=True), "crcs": item_crcs(folder)}
            times: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(args.repeats):
                for name, fn in fns.items():
                    started = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - started)
            ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
            print(f"{size:>7g}M {mb:>6.0f}MB | {ms['checked']:>10.1f} ms {ms['unchecked']:>12.1f} ms "
                  f"{ms['pick']:>11.1f} ms {ms['crcs']:>7.1f} ms")


if __name__ == "__main__":
    main()
