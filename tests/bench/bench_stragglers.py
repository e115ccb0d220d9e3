"""Per-step cost of the live straggler check on the digits example, 2 ranks (run by hand, never by CI).

    python tests/bench/bench_stragglers.py [--rounds 15] [--epochs 4]

Starts itself under torchrun with 2 processes. Each round trains the example's model for a few
epochs three ways, in turns so that drift on a shared machine hits all alike: without the check,
with ``StragglerCallback()`` as shipped (three clock readings per optimizer step, one small
all-reduce about every 60 s), and with a check after every step (``every_n_steps=1``, the
all-reduce every step: the check's own price, for scale). Prints, per way, the median time per
optimizer step over the rounds with its interquartile range (wall clock and process CPU time), the
difference of the medians to the run without the check, and the callback's own work per step timed
alone in a loop (its hooks as the Trainer dispatches them, and what its forward hook adds to a call).
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
    args = parser.parse_args()
    if "RANK" not in os.environ:  # relaunch under torchrun, 2 ranks on this machine
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'launch'}"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               *sys.argv[1:]]
        sys.exit(subprocess.run(cmd, env=env).returncode)
    measure(args.rounds, args.epochs)


def measure(rounds: int, epochs: int) -> None:
    import torch
    from torch.utils.data import DataLoader

    from anndist import StragglerCallback, Trainer
    from anndist.dist import collectives
    from train_digits import digits_datasets, digits_model

    torch.set_num_threads(1)
    train_set, _ = digits_datasets()
    loader = DataLoader(train_set, batch_size=32, shuffle=True)  # the example's defaults
    modes = {"no straggler check": lambda: [], "StragglerCallback() (default)": lambda: [StragglerCallback()],
             "check every step": lambda: [StragglerCallback(every_n_steps=1)]}
    wall = {mode: [] for mode in modes}
    cpu = {mode: [] for mode in modes}
    owner = None

    def run(callbacks):
        nonlocal owner
        model = digits_model()
        trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-3), torch.nn.CrossEntropyLoss(),
                          seed=42, handle_signals=False, progress_bar=False, callbacks=callbacks)
        owner = owner or trainer  # the first Trainer created the process group
        collectives.barrier()
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.fit(loader, num_epochs=epochs)
        steps = trainer.global_step
        return (time.perf_counter() - started) / steps, (time.process_time() - cpu_started) / steps, steps

    for round_ in range(rounds):
        order = list(modes)[round_ % len(modes):] + list(modes)[:round_ % len(modes)]
        for mode in order:
            w, c, steps = run(modes[mode]())
            wall[mode].append(w)
            cpu[mode].append(c)
    if owner.is_main_process:
        print(f"straggler check, digits example: {owner.world_size} ranks (gloo, CPU), batch 32 per rank, "
              f"{steps // epochs} steps/epoch, {rounds} rounds x {epochs} epochs each way (rank 0)")
        _report(wall, cpu)
        hooks, forward = _hook_cost()
        print(f"  the callback's own work per optimizer step, timed alone: {hooks:.2f} us in its two hooks (with the "
              f"Trainer's dispatch) + {forward:.2f} us that its forward hook adds to a module call")
    owner.close()


def _hook_cost(calls: int = 200_000) -> tuple[float, float]:
    """Microseconds per optimizer step (K=1) of the default callback's hooks as the Trainer calls them, and
    what its forward hook adds to a small module's call; best of 3, in this process (no collective)."""
    import timeit

    import torch

    from anndist import StragglerCallback
    from anndist.callbacks.base import CallbackList

    callback = StragglerCallback()
    callback._mark, callback._steps, callback._next_check = time.perf_counter, [], float("inf")
    callback._prev = callback._fwd = callback._bwd = 0.0
    callbacks, trainer = CallbackList([callback]), type("T", (), {"global_step": 0})
    backward = {"loss": None, "ends_window": True}
    end = {"loss": None, "batch_size": 32, "num_items": None, "ends_window": True, "stepped": True}

    def step() -> None:
        callbacks.call("on_backward_end", 0, trainer=trainer, logs=backward)
        callbacks.call("on_batch_end", 0, trainer=trainer, logs=end)
        callback._steps.clear()

    hooks = min(timeit.repeat(step, number=calls, repeat=3)) / calls
    module, inputs = torch.nn.Linear(64, 10), torch.randn(32, 64)
    plain = min(timeit.repeat(lambda: module(inputs), number=calls // 4, repeat=3))
    module.register_forward_hook(callback._forward_done)
    hooked = min(timeit.repeat(lambda: module(inputs), number=calls // 4, repeat=3))
    return hooks * 1e6, (hooked - plain) / (calls // 4) * 1e6


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def _report(wall: dict, cpu: dict) -> None:
    base_wall, base_cpu = (statistics.median(d["no straggler check"]) for d in (wall, cpu))
    print(f"  {'':30} {'step ms (IQR)':>22} {'vs none':>8} {'CPU ms (IQR)':>22} {'vs none':>8}")
    for mode in wall:
        parts = []
        for data, base in ((wall, base_wall), (cpu, base_cpu)):
            q1, q2, q3 = (v * 1e3 for v in _quartiles(data[mode]))
            parts.append(f"{q2:8.3f} ({q1:.3f}-{q3:.3f}) {100 * (q2 / 1e3 - base) / base:+7.2f}%")
        print(f"  {mode:30} {parts[0]:>31} {parts[1]:>31}")


if __name__ == "__main__":
    main()
