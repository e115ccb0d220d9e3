"""Instructions per optimizer step, anndist against the hand-written DDP loop, counted by valgrind (run by hand).

    python tests/bench/peers/instructions.py --nprocs 1
    python tests/bench/peers/instructions.py --nprocs 2

Wall and CPU time on this VM drift by ±15-30% from one second to the next, so a 2% difference takes
thousands of alternating repetitions to show (alternating.py, interleaved.py). The number of
instructions a step executes does not drift: run twice, it agrees to a few hundred instructions
in billions. Each runner (the small workload, K=4, defaults on, as in alternating.py) runs in its
own process under ``valgrind --tool=callgrind`` with counting off; an optimizer step hook turns
counting on at the end of step ``WARMUP`` and off at the end of step ``WARMUP + MEASURED``
(``callgrind_control``), so only steady-state steps are counted: every thread of the process (gloo's
included), user space only. The figure leaves out what instructions do not show (cache misses, waiting
for the other rank), so it complements the timings rather than replacing them. At 2 processes the
stop agreement proposes every ``stop_check_period`` seconds (0.25): under valgrind's 50x slowdown
that is nearly every step instead of every ~50, so its all-reduce weighs about 50x too much here.
Needs valgrind (``apt-get install valgrind``); a run takes 2 minutes per runner and process count.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[1]), str(HERE)]
from alternating import anndist_loop, dataset, handwritten  # noqa: E402
from workload import K  # noqa: E402

WARMUP, MEASURED = 20, 100
RUNNERS = {"hand-written": handwritten, "anndist": anndist_loop}


def count(on: bool) -> None:
    """Turn callgrind's counting on or off for this process (and wait until it has)."""
    command = subprocess.Popen(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
                               stdout=subprocess.DEVNULL)
    while command.poll() is None:  # sleeping, not spinning: the wait adds no counted instructions
        time.sleep(0.001)


def ranks_main(rank: int, world_size: int, runner: str) -> None:
    import logging
    torch.set_num_threads(1)
    logging.getLogger("anndist").setLevel(logging.WARNING)
    run = RUNNERS[runner](dataset(WARMUP + MEASURED + 5, world_size), rank, world_size)
    steps = [0]

    def toggle(*_: Any) -> None:
        steps[0] += 1
        if steps[0] in (WARMUP, WARMUP + MEASURED):
            count(steps[0] == WARMUP)

    run.optimizer.register_step_post_hook(toggle)  # type: ignore[attr-defined]
    print(f"rank {rank} pid {os.getpid()}", flush=True)
    run()
    if hasattr(run, "trainer"):
        run.trainer.close()  # type: ignore[attr-defined]


def child(runner: str, nprocs: int) -> None:
    if nprocs == 1:
        ranks_main(0, 1, runner)
    else:
        from support import run_spawn
        run_spawn(ranks_main, nprocs, runner)


def measure(runner: str, nprocs: int) -> list[int]:
    """Instructions counted in each rank, in rank order, under valgrind."""
    with tempfile.TemporaryDirectory() as workdir:
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--trace-children={'yes' if nprocs > 1 else 'no'}",
                   f"--callgrind-out-file={workdir}/callgrind.%p", sys.executable, __file__, "--child", runner,
                   "--nprocs", str(nprocs)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"{runner} under valgrind exited with {done.returncode}:\n{done.stderr[-3000:]}")
    ranks = {int(pid): int(rank) for rank, pid in re.findall(r"rank (\d+) pid (\d+)", done.stdout)}
    counts = {int(pid): int(n.replace(",", "")) for pid, n in re.findall(r"==(\d+)== Collected : ([\d,]+)", done.stderr)}
    return [counts[pid] for pid, _ in sorted(ranks.items(), key=lambda item: item[1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, default=1)
    parser.add_argument("--child", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.nprocs)
        return
    per_step = {runner: [n / MEASURED for n in measure(runner, args.nprocs)] for runner in RUNNERS}
    print(f"small workload, K={K}, {args.nprocs} process(es), instructions per optimizer step over "
          f"{MEASURED} steady-state steps (valgrind, every thread, per rank)")
    for runner, counts in per_step.items():
        print(f"{runner:14s}" + "".join(f"{c / 1e6:10.3f} M" for c in counts))
    ratios = [a / h for a, h in zip(per_step["anndist"], per_step["hand-written"])]
    print("anndist / hand-written: " + ", ".join(f"rank {r} {x:.4f}x" for r, x in enumerate(ratios)))


if __name__ == "__main__":
    main()
