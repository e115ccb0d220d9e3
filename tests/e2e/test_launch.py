"""End to end under real torchrun and plain python: the example, a failing rank, clean exits."""
import re
import time

import pytest

from support import ROOT, child_env, python, torchrun

EXAMPLE = ROOT / "launch" / "train_digits.py"


def _epoch_lines(text):
    return re.findall(r"^epoch (\d+) \| train_loss ([\d.]+) \| val_loss ([\d.]+) \| val_accuracy ([\d.]+)", text, re.M)


def test_example_under_torchrun_two_processes(tmp_path):
    weights = tmp_path / "w.pt"
    proc = torchrun(EXAMPLE, "--epochs", "20", "--save", str(weights), nproc=2)  # speed: tests/bench, not here
    lines = _epoch_lines(proc.stdout + proc.stderr)
    assert [int(e) for e, *_ in lines] == list(range(20))  # each line once: rank 0 alone prints
    assert "training on 2 process(es)" in proc.stderr
    assert float(lines[-1][3]) >= 0.95
    assert weights.exists()


def test_example_runs_single_process_for_debugging():
    proc = python(EXAMPLE, "--epochs", "3")
    assert "training on 1 process(es)" in proc.stderr
    assert [int(e) for e, *_ in _epoch_lines(proc.stderr)] == [0, 1, 2]


# launch/torchrun.sh passing its arguments on: tests/e2e/test_examples.py, with the digits example.


@pytest.mark.parametrize("fail_rank", [1])
def test_exception_on_one_rank_ends_all_ranks_with_its_traceback(fail_rank):
    started = time.perf_counter()
    proc = torchrun(ROOT / "tests" / "support" / "scripts" / "fail_on_rank.py", nproc=2, check=False, timeout=500,
                    env=child_env(FAIL_RANK=str(fail_rank)))
    elapsed = time.perf_counter() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"ValueError: boom on rank {fail_rank}" in output
    assert f"Boom.on_batch_end raised ValueError: boom on rank {fail_rank} (rank {fail_rank})" in output
    # torchrun's summary names the failing rank as the root cause
    assert re.search(rf"Root Cause.*?rank\s*:\s*{fail_rank} ", output, re.S), output[-3000:]
    # Ended by the failing rank's teardown, not by the 600 s collective timeout (taking 15-40 s here,
    # with room for a machine that other jobs share).
    assert elapsed < 300
