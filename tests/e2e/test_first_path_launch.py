"""The first hour's launches: several Trainers in one process, and a wrong launch that says so.

- ``support/scripts/trainers_in_turn.py`` builds five Trainers one after another in one process (two ``with``
  blocks, one left open with a second beside it, a last ``with`` after ``close()``) under real
  torchrun, as two plain processes given torchrun's variables (rank 0 hosts the store), and alone.
  Before the fix the second Trainer under torchrun waited in ``init_process_group`` until killed:
  each launch here has a time limit, so a hang fails.
- ``WORLD_SIZE=2 RANK=0 MASTER_ADDR=... python script.py`` (no torchrun) must say within seconds who
  waits for whom, where, and that torchrun or srun starts the others; rank 1 started alone the same.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest

from anndist.dist.env import detect_env
from anndist.dist.rendezvous import FIRST_REPORT_S, started_by, waiting_message
from support.exit_trials import free_port
from support import ROOT, child_env, python, torchrun
from support.run_once import once

SCRIPT = ROOT / "tests" / "support" / "scripts" / "trainers_in_turn.py"
TRAINERS = 5


def _results(out) -> list[list[dict]]:
    return [json.loads((out / name).read_text()) for name in sorted(os.listdir(out)) if name.endswith(".json")]


def _launch_all(folder) -> dict[str, list[list[dict]]]:
    runs = {}
    for launch in ("torchrun", "plain", "alone"):
        out = folder / launch
        out.mkdir()
        if launch == "torchrun":
            torchrun(SCRIPT, str(out), nproc=2, timeout=240)
        elif launch == "plain":
            assert _plain_pair(out) == [0, 0]
        else:
            python(SCRIPT, str(out), timeout=120)
        runs[launch] = _results(out)
    return runs


@pytest.fixture(scope="module")
def in_turn(tmp_path_factory) -> dict[str, list[list[dict]]]:
    """Each launch's results per rank: under torchrun, as plain processes, alone (once per session)."""
    return once(tmp_path_factory, "trainers_in_turn", _launch_all)


def _plain_pair(out) -> list[int]:
    """Two processes with torchrun's variables and no agent (rank 0 hosts the store), to the end."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True,
                              env=child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    try:
        return [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.mark.parametrize("launch", ("torchrun", "plain"))
def test_five_trainers_in_turn_all_train_on_two_ranks(in_turn, launch):
    ranks = in_turn[launch]
    assert len(ranks) == 2 and all(len(r) == TRAINERS for r in ranks)
    for rank, results in enumerate(ranks):
        assert [r["rank"] for r in results] == [rank] * TRAINERS
        assert [r["world_size"] for r in results] == [2] * TRAINERS
        assert [r["steps"] for r in results] == [4] * TRAINERS  # 64 samples, 8 per rank and step
        assert all(r["after"] != r["before"] for r in results)  # each one trained
        # the with-blocks created (and closed) a group each; the one beside the open Trainer reused its group
        assert [r["created_group"] for r in results] == [True, True, True, False, True]
    for first, second in zip(*ranks):  # DDP kept both ranks' weights equal, Trainer by Trainer
        assert first["after"] == second["after"]


def test_five_trainers_in_turn_alone(in_turn):
    [results] = in_turn["alone"]
    assert [(r["world_size"], r["steps"]) for r in results] == [(1, 8)] * TRAINERS
    assert all(r["after"] != r["before"] for r in results)


# ------------------------------------------------------------------ a wrong launch
def _first_line_with(proc: subprocess.Popen, text: str, limit: float) -> tuple[str | None, float]:
    """The first stderr line of ``proc`` holding ``text``, and the seconds it took from now; then ``proc`` is killed."""
    lines: queue.Queue[str | None] = queue.Queue()
    started = time.monotonic()

    def read() -> None:
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        while (left := limit - (time.monotonic() - started)) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if text in line:
                return line.strip(), time.monotonic() - started
        return None, time.monotonic() - started
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_rank_started_without_torchrun_says_whom_it_waits_for_within_seconds():
    """Rank 0 and rank 1 each started alone (on ports of their own, so they never meet), at once."""
    script = ROOT / "tests" / "support" / "scripts" / "exit_cleanly.py"
    ports = {rank: free_port() for rank in (0, 1)}
    procs = {rank: subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True,
                                    env=child_env(WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1",
                                                  MASTER_PORT=str(port)))
             for rank, port in ports.items()}
    for rank, proc in procs.items():
        # Python and torch start first (seconds on a loaded machine); the line comes FIRST_REPORT_S into the wait.
        line, took = _first_line_with(proc, "to join the process group", limit=90)
        assert line is not None, f"rank {rank}: no waiting line within {took:.0f} s"
        assert f"rank {rank} of 2 has waited {FIRST_REPORT_S:.0f} s" in line
        assert f"127.0.0.1:{ports[rank]}" in line
        assert ("rank 0 at" in line) if rank else ("for the other 1 (rank 1)" in line)
        assert "neither torchrun nor srun started it" in line and "torchrun --nproc_per_node=2" in line
        assert "dist_timeout=600 s" in line


def test_the_waiting_line_names_the_launcher_that_started_the_rank():
    by_hand = {"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}
    torchrun_env = {**by_hand, "TORCHELASTIC_RUN_ID": "job"}
    srun = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "7",
            "SLURM_STEP_NODELIST": "node[0-1]"}
    assert started_by(detect_env(by_hand), by_hand) is None
    assert started_by(detect_env(torchrun_env), torchrun_env) == "torchrun"
    assert started_by(detect_env(srun), srun) == "srun"
    line = waiting_message(detect_env(torchrun_env), torchrun_env, 31.2, timedelta(minutes=10))
    assert line.startswith("rank 0 of 4 has waited 31 s at node0:29400 for the other 3 (ranks 1-3)")
    assert "torchrun started this process" in line and "the same torchrun command on every node" in line
    line = waiting_message(detect_env(srun), srun, 30, timedelta(seconds=90))
    assert line.startswith("rank 2 of 4 has waited 30 s for rank 0 at node0:15007")
    assert "srun started this process" in line and "dist_timeout=90 s" in line
