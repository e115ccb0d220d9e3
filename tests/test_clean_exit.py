"""A user's two-rank script exits 0 on every rank, every time (torch 2.13 gloo can SIGABRT at exit).

Without anndist's teardown, 8 of 25 such launches had a rank die of SIGABRT on this machine; this
test runs 10, so a broken teardown fails it with probability about 98%. tests/exit_trials.py runs
a longer soak by hand: `python tests/exit_trials.py 100`.
"""
from exit_trials import launch_pair
from processes import ROOT


def test_ten_two_rank_launches_all_exit_zero():
    script = str(ROOT / "tests" / "scripts" / "exit_cleanly.py")
    codes = [launch_pair(script) for _ in range(10)]
    assert codes == [[0, 0]] * 10
