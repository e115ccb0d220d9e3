"""``python -m anndist.preflight --strict`` under real torchrun, 2 ranks, each pinned to a core of its own:
with a CPU hog on rank 1's core the table names rank 1 and its host as lagging and every rank exits 1;
without it the check passes.

What "slow" means on a machine shared with other work: whatever shares a rank's core slows it, and the
scheduler spreads the other work so that both cores end up about as busy, which would hide the hog.
``scripts/hog_session.sh`` and ``scripts/pinned_rank.sh`` therefore run the ranks and the hog above
that work (the top priority, where allowed) and each on its core: rank 0 has core A to itself, rank
1 shares core B with the hog and gets about half of it, in the same run. Two launches in all.
"""
from __future__ import annotations

import os
import re
import socket
import sys

import pytest

from support import ROOT, child_env, run

CPUS = sorted(os.sched_getaffinity(0))[:2]


def launch(hog_cpu: str) -> tuple[int, str]:
    """The check under torchrun, each rank pinned (rank r to CPUS[r]); a hog on ``hog_cpu`` ("-": none)."""
    cmd = ["bash", ROOT / "tests/support/scripts/hog_session.sh", hog_cpu,
           sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
           "bash", ROOT / "tests/support/scripts/pinned_rank.sh", sys.executable, "-m", "anndist.preflight", "--strict",
           ROOT / "launch/train_digits.py"]
    proc = run(cmd, timeout=120, env=child_env(PIN_CPUS=",".join(map(str, CPUS)), PYTHON=sys.executable,
                                               HOG_SECONDS="100"), check=False)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def launches() -> dict[str, tuple[int, str]]:
    if len(CPUS) < 2:
        pytest.fail(f"the check pins its 2 ranks to 2 cores; this process may run on {CPUS} only")
    return {"hogged": launch(str(CPUS[1])), "healthy": launch("-")}


def rows(out: str) -> dict[int, list[str]]:
    host = socket.gethostname()
    found = {int(line.split()[0]): line.split() for line in out.splitlines()
             if re.match(r"\s*\d+\s", line) and line.split()[1] == host[:16]}
    assert sorted(found) == [0, 1], out[-4000:]
    return found


def test_the_rank_sharing_its_core_with_a_hog_is_named_with_its_host_and_strict_exits_1(launches):
    status, out = launches["hogged"]
    host = socket.gethostname()
    assert status == 1, out[-4000:]
    table = rows(out)
    assert table[1][-1] == "LAG" and table[0][-1] == "ok", out[-4000:]
    assert float(table[1][6]) < 0.75 < float(table[0][6]), out[-4000:]  # x others
    lag = next(line for line in out.splitlines() if line.startswith("LAG "))
    assert lag.startswith(f"LAG rank(s) 1 on {host}: compute "), out[-4000:]
    assert "another busy process shares its core(s)" in lag, lag
    summary = next(line for line in out.splitlines() if line.startswith("preflight: "))
    assert f"(lagging: rank(s) 1 on host(s) {host})" in summary, summary


def test_a_healthy_run_passes_in_seconds(launches):
    status, out = launches["healthy"]
    assert status == 0, out[-4000:]
    assert all(row[-1] == "ok" for row in rows(out).values()), out[-4000:]
    summary = next(line for line in out.splitlines() if line.startswith("preflight: "))
    match = re.fullmatch(r"preflight: passed, 2 rank\(s\), in (\d+\.\d) s", summary)
    assert match and float(match.group(1)) < 5, summary
