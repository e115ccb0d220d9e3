"""A user's two-rank script exits 0 on every rank, every time (torch 2.13 gloo can SIGABRT at exit).

Without anndist's teardown, 8 of 25 such launches had a rank die of SIGABRT on this machine; this
file runs 5 (each its own test), so a broken teardown fails one of them with probability about
85% (1 - (17/25)^5), and the suite's other torchrun launches (about 40, each asserting that every rank
exited 0) make a miss of the whole suite unlikely. A longer soak, by hand:
`python -m tests.support.exit_trials 100`.

Each launch is a test of its own with its own time limit: one launch took 15-23 s on the 2-core
VM under load (22-33 s at load average 8.5), and ten in a row inside one test's 300 s limit did
not always fit. LAUNCH_LIMIT_S (3.6x the slowest measured) ends a hung launch before pytest's
limit, killing both ranks; pytest-xdist may spread the launches over its workers.
"""
import pytest

from support import ROOT
from support.exit_trials import launch_pair

TRIALS = 5
LAUNCH_LIMIT_S = 120


@pytest.mark.parametrize("trial", range(TRIALS))
def test_two_rank_launch_exits_zero(trial):
    script = str(ROOT / "tests" / "support" / "scripts" / "exit_cleanly.py")
    assert launch_pair(script, timeout=LAUNCH_LIMIT_S) == [0, 0]
