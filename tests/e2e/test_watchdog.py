"""The watchdog ends a torchrun job with a hung rank quickly, naming it, with every rank's stacks."""
import os
import time

from support import ROOT, child_env, torchrun


def test_hung_rank_is_named_and_its_stack_dumped(tmp_path):
    env = child_env(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    started = time.monotonic()
    proc = torchrun(ROOT / "tests/support/scripts/hang_rank.py", str(tmp_path), env=env, check=False, timeout=110)
    elapsed = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and elapsed < 60, (elapsed, out[-3000:])  # dist_timeout is 120 s
    assert "rank(s) [1] did not reach the collective" in out, out[-3000:]
    stacks = {r: (tmp_path / f"watchdog-rank{r}.txt").read_text() for r in (0, 1)}
    assert "on_batch_end" in stacks[1] and "hang_rank.py" in stacks[1]
    assert "Thread" in stacks[0] or "Current thread" in stacks[0]
