"""Per-rank costs of a run at N = 2, 4, 8, 16, 32 gloo ranks on this machine, counted (issue 31).

    python tests/bench/bench_scale.py [--sizes 2 4 8 16 32] [--json scale.json]
    python tests/bench/bench_scale.py --from-json scale.json   # the table again, from the kept counts

For each N, N spawned ranks (a TCPStore, gloo) run a tiny DDP job through every phase, each counted
from outside the library (``tests/support/counting.py``): the collectives a rank takes part in and
the bytes they bring it, its operations on the store, the bytes it reads and writes.

- ``start``: the process group and the Trainer (DDP); ``start (async saves)``: a Trainer with
  ``async_checkpoint=True`` (its gloo group for DCP's writer thread);
- ``step``: one optimizer step (from fits of 4 and 8 steps: the difference over 4; ``stop_check_period=0``,
  the stop agreement every step, the most it costs);
- ``save``, ``resume``: a single-file checkpoint (``save_in_dir``; a new Trainer's ``fit(resume_from=)``,
  which picks the file and loads it); ``save (async folder)``, ``resume (folder)``: the same as DCP folders;
- ``stop``: a fit that one rank stops after its second step (3 steps, the stop agreement's);
- ``watchdog``: every rank's watchdog fires, rank 1 behind (the verdict, as in a hang);
  ``timeout``: every rank but the last saw a collective time out (``dist/timeouts.py``).

Counts do not depend on the machine (times do: the 2 cores are shared, so 32 ranks run slowly). Prints
per phase the writer/judge (rank 0), the largest figure over the other ranks, and how each grows with
N (fitted: O(1), O(log N), O(N)); ``--json`` keeps every rank's counts. docs/scale.md reads them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

METRICS = ("collectives", "received", "store_ops", "read", "written")


class _Both:
    """The operations of two counting stores, added up (what ``Meter`` reads)."""

    def __init__(self, *stores) -> None:
        self.stores = stores

    @property
    def ops(self):
        import collections
        return sum((collections.Counter(s.ops) for s in self.stores), collections.Counter())


class Recorder:
    """This rank's counts, by phase."""

    def __init__(self, meter) -> None:
        self.meter, self.phases, self.floor = meter, {}, 0
        self.floor = min(self.counted(lambda: None)["read"] for _ in range(3))  # the meter's own /proc read

    def counted(self, run) -> dict:
        from support.counting import Counts
        counts, started = Counts(), time.perf_counter()
        with self.meter.measure(counts):
            run()
        found = counts.as_dict()
        return {**found, "read": max(found["read"] - self.floor, 0), "seconds": time.perf_counter() - started}

    def measure(self, name: str, run) -> None:
        found = self.counted(run)
        before = self.phases.get(name)
        self.phases[name] = found if before is None else {k: (before[k] + found[k] if k != "store" else
                                                               {**before[k], **found[k]}) for k in found}


def _rank(rank: int, world: int, port: int, root: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist
    from support.counting import CountingStore, Meter

    import anndist.checkpoint.sharded  # noqa: F401 (imports are not the start's reads)
    import torch.distributed.checkpoint  # noqa: F401
    import torch.nn.parallel  # noqa: F401
    from anndist.dist import arrival

    torch.set_num_threads(1)
    root_path = Path(root)
    # The store's server runs in the launching process: on rank 0 its socket reads would count as rank 0's.
    tcp = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=600))
    store = CountingStore(tcp)  # the group's: torch's own operations (gloo's connections) come through it
    # anndist's, through a Python wrapper of its own: torch's PrefixStore cannot delete keys through a
    # store written in Python (its delete_key is not forwarded), a TCPStore's own can.
    library = CountingStore(dist.PrefixStore("default_pg", dist.TCPStore("127.0.0.1", port, world, is_master=False)))
    arrival.default_store = lambda: library
    record = Recorder(Meter(_Both(store, library), root_path).install())
    record.measure("start", lambda: dist.init_process_group("gloo", store=store, rank=rank, world_size=world))
    _trainer(None)  # the modules a Trainer imports (8 MB of reads, once per process), not counted
    record.measure("start", lambda: _trainer(None))
    job = Job(root_path, world, record, library)
    keys = job.run()
    (root_path / f"rank{rank}.json").write_text(json.dumps({"phases": record.phases, "keys": keys,
                                                             "sizes": job.sizes}))
    dist.barrier()
    dist.destroy_process_group()


def _trainer(folder: Path | None, **options):
    import torch
    from torch import nn

    from anndist import Trainer
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
    return Trainer(model, torch.optim.AdamW(model.parameters(), lr=0.01), nn.CrossEntropyLoss(), seed=0,
                   checkpoint_dir=folder, progress_bar=False, handle_signals=False, stop_check_period=0, **options)


class Job:
    """The phases after ``start``, on every rank; returns the store's key count before and after the saves."""

    def __init__(self, root: Path, world: int, record: Recorder, store) -> None:
        self.root, self.world, self.record, self.store = root, world, record, store
        self.sizes: dict[str, int] = {}  # bytes of the checkpoint each kind of save made

    def loader(self, steps: int):
        from torch.utils.data import DataLoader
        from support import make_dataset
        return DataLoader(make_dataset(4 * self.world * steps), batch_size=4)

    def run(self) -> tuple[int, int]:
        self.steps()
        keys = self.single_files()
        self.folders()
        self.failures()
        return keys

    def steps(self) -> None:
        from support.counting import count_ddp_gradients
        short, long = _trainer(None), _trainer(None)
        for trainer in (short, long):
            count_ddp_gradients(trainer.strategy.train_module)
        _trainer(None).fit(self.loader(1), num_epochs=1)  # the imports a fit needs, once
        four = self.record.counted(lambda: short.fit(self.loader(4), num_epochs=1))
        eight = self.record.counted(lambda: long.fit(self.loader(8), num_epochs=1))
        self.record.phases["step"] = {**{k: (eight[k] - four[k]) / 4 for k in (*METRICS, "seconds")}, "store": {}}

    def single_files(self) -> tuple[int, int]:
        import torch.distributed as dist
        folder = self.root / "file"
        trainer = _trainer(folder)
        trainer.fit(self.loader(4), num_epochs=1)
        dist.barrier()
        before = self.store.num_keys()
        dist.barrier()
        for _ in range(2):
            trainer.save_in_dir(folder)
        self.record.measure("save", lambda: trainer.save_in_dir(folder))
        dist.barrier()
        after = self.store.num_keys()
        self.sizes["file"] = sum(f.stat().st_size for f in folder.glob("*.ckpt") if f.is_file())
        _trainer(folder).fit(self.loader(4), num_epochs=1, resume_from=folder)  # the imports a resume needs, once
        resumed = _trainer(folder)
        self.record.measure("resume", lambda: resumed.fit(self.loader(4), num_epochs=1, resume_from=folder))
        return before, after

    def folders(self) -> None:
        import torch.distributed as dist
        folder, made = self.root / "folder", []
        self.record.measure("start (async saves)", lambda: made.append(_trainer(folder, async_checkpoint=True)))
        writer = made[0]
        writer.fit(self.loader(4), num_epochs=1)
        writer.save_in_dir(folder)
        self.record.measure("save (async folder)", lambda: (writer.save_in_dir(folder), writer.checkpoints.wait()))
        dist.barrier()
        self.sizes["folder"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        _trainer(folder, async_checkpoint=True).fit(self.loader(4), num_epochs=1, resume_from=folder)
        reader = _trainer(folder, async_checkpoint=True)
        self.record.measure("resume (folder)", lambda: reader.fit(self.loader(4), num_epochs=1, resume_from=folder))

    def failures(self) -> None:
        import torch.distributed as dist
        from anndist import Callback
        world = self.world

        class StopOnLastRank(Callback):
            def on_batch_end(self, batch_idx, trainer, logs=None):
                trainer.stop_training = trainer.stop_training or (trainer.rank == world - 1 and batch_idx == 1)

        stopping = _trainer(None, callbacks=[StopOnLastRank()])
        self.record.measure("stop", lambda: stopping.fit(self.loader(8), num_epochs=1))
        self.record.measure("watchdog", lambda: _watchdog(self.store))
        dist.barrier()
        self.record.measure("timeout", lambda: _timeout(world))
        dist.barrier()


def _watchdog(store) -> None:
    import torch.distributed as dist
    from anndist.callbacks.watchdog import Watchdog
    dog = Watchdog(timeout=5.0)
    dog.rank, dog.world_size, dog.store = dist.get_rank(), dist.get_world_size(), store
    dog.count = 10 - (dog.rank == 1)
    behind, _ = dog._behind()
    assert behind == [1], behind


def _timeout(world: int) -> None:
    import torch.distributed as dist
    from anndist.dist import timeouts
    if dist.get_rank() != world - 1:
        error = timeouts.never_arrived(RuntimeError("gloo: timed out"), timedelta(seconds=5))
        assert f"[{world - 1}] never arrived" in str(error), error


def run_size(world: int) -> dict:
    import torch.distributed as dist
    import torch.multiprocessing as mp
    server = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=600))
    port = server.port
    with tempfile.TemporaryDirectory(prefix=f"scale{world}-") as root:
        started = time.perf_counter()
        mp.start_processes(_rank, args=(world, port, root), nprocs=world, start_method="spawn")
        ranks = [json.loads((Path(root) / f"rank{r}.json").read_text()) for r in range(world)]
        return {"ranks": ranks, "seconds": time.perf_counter() - started}


def growth(sizes: list[int], values: list[float], metric: str = "") -> str:
    """How ``values`` grow with ``sizes``: the closest of a, a + b log2 N, a + b N (least squares, relative).
    Reads and writes under 1 kB are the system's (``/proc``, ``/etc``), not the run's: "~0"."""
    if metric in ("read", "written") and max(values) < 1024:
        return "~0 (< 1 kB)"
    if max(values) <= 1.15 * min(values) or max(values) - min(values) <= 16:
        return "O(1)"
    if values[-1] < values[0] and values == sorted(values, reverse=True):
        return "falls with N"
    best, name = math.inf, ""
    for label, f in (("O(log N)", math.log2), ("O(N)", float), ("O(N^2)", lambda n: float(n * n))):
        xs = [f(n) for n in sizes]
        mean_x, mean_y = sum(xs) / len(xs), sum(values) / len(values)
        slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, values))
                 / max(sum((x - mean_x) ** 2 for x in xs), 1e-12))
        error = sum((mean_y + slope * (x - mean_x) - y) ** 2 for x, y in zip(xs, values)) / max(mean_y, 1) ** 2
        if error < best:
            best, name = error, label
    return name


PHASES = ("start", "start (async saves)", "step", "save", "resume", "save (async folder)", "resume (folder)",
          "stop", "watchdog", "timeout")


def table(results: dict[int, dict]) -> str:
    sizes = sorted(results)
    lines = [f"| phase | counted | rank | {' | '.join(f'N={n}' for n in sizes)} | growth |",
             "|---|---|---|" + "---|" * len(sizes) + "---|"]
    for phase in PHASES:
        for metric in METRICS:
            summed = metric in ("read", "written") and phase.startswith(("save", "resume"))
            for who in ("0", "others (max)", "all (sum)")[:3 if summed else 2]:
                values = []
                for n in sizes:
                    ranks = results[n]["ranks"]
                    picked = [r["phases"][phase][metric] for r in ([ranks[0]] if who == "0" else
                                                                   ranks[1:] if who == "others (max)" else ranks)]
                    values.append(sum(picked) if who == "all (sum)" else max(picked))
                if not any(values):
                    continue
                shown = " | ".join(f"{v:,.0f}" if v >= 10 or float(v).is_integer() else f"{v:.2f}" for v in values)
                lines.append(f"| {phase} | {metric} | {who} | {shown} | {growth(sizes, values, metric)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--json", type=Path, default=None, help="write every rank's counts here")
    parser.add_argument("--from-json", type=Path, default=None, help="print the table of counts kept by --json")
    args = parser.parse_args()
    if args.from_json is not None:
        print(table({int(n): r for n, r in json.loads(args.from_json.read_text()).items()}))
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    results = {}
    for n in args.sizes:
        results[n] = run_size(n)
        keys = {tuple(r["keys"]) for r in results[n]["ranks"]}
        print(f"N={n}: {results[n]['seconds']:.0f} s; store keys before/after three saves: {sorted(keys)}; "
              f"checkpoint bytes: {results[n]['ranks'][0]['sizes']}", flush=True)
    print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps({str(n): r for n, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
