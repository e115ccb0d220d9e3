"""Per-step cost of the stop agreement on the digits example, 2 ranks (run by hand, never by CI).

    python tests/bench/bench_stop_agreement.py [--rounds 15] [--epochs 4] [--period 0.05]

Starts itself under torchrun with 2 processes. Each round trains the example's model for a few
epochs three ways, in turns so that drift on a shared machine hits all alike: with the Trainer's
agreement after every optimizer step (``stop_check_period=0``: one async MAX all-reduce per step, read one step
later, which lets every rank stop at the same step after a signal), with ``stop_check_period``
(the all-reduce about every PERIOD seconds), and with the agreement replaced by a no-op. Prints the
median step time of each and the difference to the no-op as a share of the step (target: under
1 %), the time spent inside the agreement call (what it adds to the critical path), and the CPU
time per step (what it costs in work, whether or not a core was free at the time).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per measurement")
    parser.add_argument("--period", type=float, default=0.05, help="stop_check_period of the spaced variant")
    args = parser.parse_args()
    if "RANK" not in os.environ:  # relaunch under torchrun, 2 ranks on this machine
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'launch'}"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               *sys.argv[1:]]
        sys.exit(subprocess.run(cmd, env=env).returncode)
    measure(args.rounds, args.epochs, args.period)


def measure(rounds: int, epochs: int, period: float) -> None:
    import torch
    from torch.utils.data import DataLoader

    from anndist import Trainer
    from anndist.dist import collectives
    from train_digits import digits_datasets, digits_model

    torch.set_num_threads(1)
    train_set, _ = digits_datasets()
    loader = DataLoader(train_set, batch_size=32, shuffle=True)  # the example's defaults
    modes = {"every step (period 0)": 0.0, f"stop_check_period={period:g}" + (" (default)" if period == 0.05 else ""): period, "no agreement": None}
    wall = {mode: [] for mode in modes}
    cpu = {mode: [] for mode in modes}  # process CPU time (all threads)
    in_call = {mode: [] for mode in modes}
    owner = None
    for round_ in range(rounds):
        order = list(modes)[round_ % len(modes):] + list(modes)[:round_ % len(modes)]
        for mode in order:
            model = digits_model()
            trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-3), torch.nn.CrossEntropyLoss(),
                              seed=42, handle_signals=False, stop_check_period=modes[mode] or 0.0)
            owner = owner or trainer  # the first Trainer created the process group
            spent = _instrument(trainer, modes[mode] is not None)
            collectives.barrier()
            started, cpu_started = time.perf_counter(), time.process_time()
            trainer.fit(loader, num_epochs=epochs)
            steps = trainer.global_step
            wall[mode].append((time.perf_counter() - started) / steps)
            cpu[mode].append((time.process_time() - cpu_started) / steps)
            in_call[mode].append(spent[0] / steps)
    if owner.is_main_process:
        print(f"stop agreement, digits example: {owner.world_size} ranks (gloo, CPU), batch 32 per rank, "
              f"{steps // epochs} steps/epoch, {rounds} rounds x {epochs} epochs each way (medians, rank 0)")
        _report(wall, cpu, in_call)
    owner.close()


def _instrument(trainer, agree: bool) -> list[float]:
    """Replace the agreement by a no-op (agree=False) or time every call of it (agree=True)."""
    agreement, spent = trainer._agreement, [0.0]
    if not agree:
        agreement.propose = lambda flag: False
        return spent
    propose = agreement.propose

    def timed(flag: bool) -> bool:
        started = time.perf_counter()
        try:
            return propose(flag)
        finally:
            spent[0] += time.perf_counter() - started

    agreement.propose = timed
    return spent


def _report(wall: dict, cpu: dict, in_call: dict) -> None:
    base_wall, base_cpu = (statistics.median(d["no agreement"]) * 1e3 for d in (wall, cpu))
    print(f"  {'':24} {'step ms':>8} {'vs no-op':>9} {'in call ms':>11} {'in call %':>10} {'CPU ms':>7} {'CPU vs no-op':>13}")
    for mode in wall:
        w, c, call = (statistics.median(d[mode]) * 1e3 for d in (wall, cpu, in_call))
        print(f"  {mode:24} {w:8.3f} {100 * (w - base_wall) / base_wall:+8.2f}% {call:11.3f} {100 * call / w:9.2f}% "
              f"{c:7.3f} {100 * (c - base_cpu) / base_cpu:+12.2f}%")
    print("  target: under 1 % of the step; wall-clock figures on a shared machine are preliminary")


if __name__ == "__main__":
    main()
