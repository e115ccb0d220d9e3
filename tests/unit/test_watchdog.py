"""The watchdog ends a job with a hung rank quickly, naming it, with every rank's stacks."""
import os
import time

import pytest

from anndist import Trainer
from anndist.dist.flight_recorder import enable_flight_recorder, flight_recorder_env
from support import ROOT, child_env, make_model, torchrun

import torch


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


def test_flight_recorder_variables_only_for_nccl_and_never_over_the_users(tmp_path):
    assert flight_recorder_env("gloo", tmp_path, {}) == {}
    wanted = flight_recorder_env("cpu:gloo,cuda:nccl", tmp_path, {"TORCH_NCCL_TRACE_BUFFER_SIZE": "5"})
    assert wanted == {"TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                      "TORCH_FR_DUMP_TEMP_FILE": str(tmp_path.resolve() / "nccl_trace_rank_")}
    environ = {}
    enable_flight_recorder("nccl", tmp_path / "ckpt", environ)
    assert environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and (tmp_path / "ckpt").is_dir()


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1, ValueError), (float("inf"), ValueError),
                                          (True, TypeError), ("10", TypeError)])
def test_watchdog_timeout_must_be_positive_seconds(value, error):
    model = make_model()
    with pytest.raises(error, match="watchdog_timeout"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), watchdog_timeout=value)
