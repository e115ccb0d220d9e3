"""Resume in new processes, bit for bit: python and torchrun, after a stop, a SIGKILL mid-save and a
torchrun restart, and from 2 ranks onto 1. The fixed run is tests/support/scripts/ckpt_train.py (shuffling, dropout,
accumulation K=2, AdamW with a per-step schedule, validation, 3 epochs of 100 samples in batches of 4).

Process starts are shared: each fixture starts one process (or one torchrun) that does several runs.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

import pytest
import torch

from anndist import latest_checkpoint
from support import ROOT, python, torchrun

ENTRY = ROOT / "tests" / "support" / "scripts" / "ckpt_train.py"
TORCHRUN_FAST_RESTART = ("--max-restarts=1", "--monitor-interval=0.2")


@contextlib.contextmanager
def _once(tmp: Path, name: str):
    """Under pytest-xdist this module's tests can land on both workers; they share ``tmp``, and the
    first worker to need a launch makes it while the other waits on a lock and reads its results."""
    with open(tmp / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield tmp / f"{name}.done"


def _start(tmp: Path, name: str, runs: list[dict], nproc: int = 0, torchrun_args: tuple = ()) -> dict:
    out = tmp / f"{name}.pt"
    with _once(tmp, name) as done:
        if not done.exists():
            args = ("--runs", json.dumps(runs), "--out", str(out))
            proc = torchrun(ENTRY, *args, nproc=nproc, torchrun_args=torchrun_args) if nproc else python(ENTRY, *args)
            (tmp / f"{name}.stderr").write_text(proc.stderr)
            done.touch()
    results = torch.load(out, weights_only=False)
    results["_stderr"] = (tmp / f"{name}.stderr").read_text()
    return results


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.mktemp("resume")
    shared = tmp_path_factory.getbasetemp().parent / "resume"  # this session's, common to its workers
    shared.mkdir(exist_ok=True)
    return shared


@pytest.fixture(scope="module")
def two_ranks(tmp):
    """torchrun, 2 ranks: the straight run (ModelCheckpoint every 3 steps) and a run stopped at step 10."""
    return _start(tmp, "two_ranks", [
        {"name": "straight", "ckpt_dir": str(tmp / "t-straight"), "every_n_steps": 3, "keep_last": None},
        {"name": "stop", "stop_at_step": 10, "stop_path": str(tmp / "t-stop" / "stopped.ckpt")},
    ], nproc=2)


@pytest.fixture(scope="module")
def one_rank(tmp):
    """python: the straight run (ModelCheckpoint every 5 steps) and a run stopped at step 17."""
    return _start(tmp, "one_rank", [
        {"name": "straight", "ckpt_dir": str(tmp / "s-straight"), "every_n_steps": 5},
        {"name": "stop", "stop_at_step": 17, "stop_path": str(tmp / "s-stop" / "stopped.ckpt")},
    ])


@pytest.fixture(scope="module")
def killed_in_save(tmp):
    """python runs SIGKILLed during their 3rd checkpoint (step 6): halfway through the write, or
    after the file is complete but before ``latest`` names it. Returns the exit codes."""
    with _once(tmp, "killed") as done:
        if not done.exists():
            codes = {}
            for where in ("write", "commit"):
                runs = [{"name": where, "ckpt_dir": str(tmp / f"k-{where}"), "every_n_steps": 2,
                         "sigkill_save": [3, where]}]
                proc = python(ENTRY, "--runs", json.dumps(runs), "--out", str(tmp / f"k-{where}.pt"), check=False)
                codes[where] = proc.returncode
            done.write_text(json.dumps(codes))
        return json.loads(done.read_text())


@pytest.fixture(scope="module")
def resumed_one_rank(tmp, one_rank, two_ranks, killed_in_save):
    """One new python process resuming: the stopped run, a periodic mid-epoch checkpoint, both killed
    folders (``latest``), and the 2-rank stopped run on 1 rank."""
    return _start(tmp, "resumed_one_rank", [
        {"name": "stop", "resume_from": str(tmp / "s-stop" / "stopped.ckpt")},
        {"name": "periodic", "resume_from": str(tmp / "s-straight" / "step-000000035.ckpt")},
        {"name": "k-write", "resume_from": str(tmp / "k-write")},
        {"name": "k-commit", "resume_from": str(tmp / "k-commit")},
        {"name": "two_to_one", "resume_from": str(tmp / "t-stop" / "stopped.ckpt")},
    ])


def _same_run(resumed: dict, straight: dict) -> None:
    assert torch.equal(resumed["params"], straight["params"])
    assert resumed["history"] == straight["history"]  # train_loss of the resumed epoch included
    assert resumed["end"] == straight["end"]


def test_one_rank_stopped_mid_epoch_resumes_bit_identical(one_rank, resumed_one_rank):
    stopped, resumed, straight = one_rank["stop"], resumed_one_rank["stop"], one_rank["straight"]
    assert stopped["end"] == {"epoch": 1, "global_step": 17, "batch_in_epoch": 8}  # mid-epoch 1 of 0..2
    assert {k: resumed["begin"][k] for k in ("epoch", "global_step", "batch_in_epoch")} == stopped["end"]
    assert torch.equal(resumed["begin"]["params"], stopped["params"])
    _same_run(resumed, straight)
    _same_run(resumed_one_rank["periodic"], straight)
    assert not torch.equal(stopped["params"], straight["params"])  # the comparison has teeth


def test_resume_skips_consumed_batches_without_reading_them(one_rank, resumed_one_rank):
    order = one_rank["straight"]["reads"][0][1]  # the epoch-1 sample order of the straight run
    assert sorted(order) == list(range(100))
    resumed = resumed_one_rank["stop"]["reads"][0]
    assert resumed[1] == order[8 * 4:]  # 8 batches of 4 were trained before the stop: never read again
    assert 0 not in resumed and resumed[2] == one_rank["straight"]["reads"][0][2]


def test_two_ranks_stopped_mid_epoch_resume_bit_identical(tmp, two_ranks):
    resumed = _start(tmp, "resumed_two_ranks", [
        {"name": "stop", "resume_from": str(tmp / "t-stop" / "stopped.ckpt")},
        {"name": "periodic", "resume_from": str(tmp / "t-straight" / "step-000000009.ckpt")},
    ], nproc=2)
    stopped, straight = two_ranks["stop"], two_ranks["straight"]
    assert stopped["end"] == {"epoch": 1, "global_step": 11, "batch_in_epoch": 8}  # the stop lands one step late
    for name in ("stop", "periodic"):
        _same_run(resumed[name], straight)
    for rank in (0, 1):
        batches = resumed["stop"]["begin"]["batch_in_epoch"]
        assert resumed["stop"]["reads"][rank][1] == straight["reads"][rank][1][batches * 4:]
    assert not torch.equal(stopped["params"], straight["params"])


def test_sigkill_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp, killed_in_save, one_rank, resumed_one_rank):
    assert killed_in_save == {"write": -9, "commit": -9}
    torn = [p for p in (tmp / "k-write").iterdir() if p.name.startswith(".step-000000006.ckpt.")]
    assert len(torn) == 1 and torn[0].name.endswith(".tmp")  # the kill did land inside the write
    with pytest.raises(Exception):
        torch.load(torn[0], weights_only=True)
    assert latest_checkpoint(tmp / "k-write") == tmp / "k-write" / "step-000000004.ckpt"
    # ... because the pointer never moved: it is updated only once the new file is complete.
    assert (tmp / "k-write" / "latest").read_text() == "step-000000004.ckpt\n"
    # Killed after step 6 was complete but before the pointer moved: the commit had not happened.
    assert (tmp / "k-commit" / "step-000000006.ckpt").exists()
    assert latest_checkpoint(tmp / "k-commit") == tmp / "k-commit" / "step-000000004.ckpt"
    assert (tmp / "k-commit" / "latest").read_text() == "step-000000004.ckpt\n"
    for name in ("k-write", "k-commit"):  # and a new process continues from there, exactly
        assert resumed_one_rank[name]["begin"]["global_step"] == 4
        _same_run(resumed_one_rank[name], one_rank["straight"])


def test_torchrun_restart_after_sigkill_auto_resumes_exactly(tmp, two_ranks):
    restarted = _start(tmp, "restart", [{
        "name": "restart", "ckpt_dir": str(tmp / "t-restart"), "every_n_steps": 2, "auto_resume": True,
        "sigkill_rank": 1, "sigkill_step": 9,
    }], nproc=2, torchrun_args=TORCHRUN_FAST_RESTART)
    run = restarted["restart"]
    assert run["restart_count"] == 1  # the first attempt died (rank 1, SIGKILL at step 9)
    assert "exitcode: -9" in restarted["_stderr"]
    assert run["begin"]["global_step"] == 8  # the newest checkpoint before the kill
    _same_run(run, two_ranks["straight"])


def test_two_ranks_resume_on_one_with_the_same_samples_seen(one_rank, two_ranks, resumed_one_rank):
    stopped, resumed = two_ranks["stop"], resumed_one_rank["two_to_one"]
    begin = resumed["begin"]
    assert torch.equal(begin["params"], stopped["params"])
    saved_opt, loaded_opt = stopped["optimizer"], begin["optimizer"]
    assert saved_opt["param_groups"] == loaded_opt["param_groups"]
    for index, state in saved_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(loaded_opt["state"][index][key], value), (index, key)
    assert (begin["epoch"], begin["global_step"]) == (1, 11)
    assert begin["batch_in_epoch"] == 2 * stopped["end"]["batch_in_epoch"]  # 64 samples: 2 ranks x 8 x 4
    # The epoch's global order does not depend on the world size: ranks 0 and 1 had trained
    # order[0:64:2] and order[1:64:2]; the single rank continues with exactly order[64:].
    order = one_rank["straight"]["reads"][0][1]
    trained = [stopped["reads"][rank][1][:32] for rank in (0, 1)]
    assert trained == [order[0:64:2], order[1:64:2]]
    assert resumed["reads"][0][1] == order[64:]
    assert sorted(resumed["reads"][0][2]) == list(range(100)) and resumed["end"]["epoch"] == 3
    assert "written by 2 rank(s), resuming on 1" in resumed_one_rank["_stderr"]
