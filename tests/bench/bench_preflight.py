"""Wall time of ``python -m anndist.preflight`` under torchrun at 2 and 4 ranks (run by hand, never by CI).

    python tests/bench/bench_preflight.py [--repeats 5] [--ranks 2 4]

Per rank count: the median and range over the repeats of the check's own time (the ``in X s`` of its
summary line: from the first collective to the verdict) and of the whole launch (torchrun, Python
and torch imports, the process group, the check, the exit). The check's figures: 8 rounds of
0.08 s of compute, 20 + 3 ping-pongs per node, 20 + 3 all-reduces, the folder probe.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as folder:
        for ranks in args.ranks:
            check, launch = [], []
            for _ in range(args.repeats):
                started = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       f"--nproc_per_node={ranks}", "-m", "anndist.preflight", "--checkpoint-dir",
                                       folder, str(ROOT / "launch/train_digits.py")],
                                      env=env, capture_output=True, text=True, check=True)
                launch.append(time.perf_counter() - started)
                check.append(float(re.search(r"^preflight: .* in ([\d.]+) s$", proc.stdout, re.MULTILINE).group(1)))
            print(f"{ranks} ranks: the check {statistics.median(check):.1f} s ({min(check):.1f}-{max(check):.1f}), "
                  f"the whole launch {statistics.median(launch):.1f} s ({min(launch):.1f}-{max(launch):.1f}), "
                  f"median (range) of {args.repeats}")
            print(proc.stdout.rstrip())


if __name__ == "__main__":
    main()
