"""``python -m anndist.launcher``: torchrun that ends a preemption (every worker exits 75) quietly.

Real launches of a tiny worker (``scripts/launcher_worker.py``), shared by the tests through one
module-scoped fixture: exit 75 and a SIGTERM that the workers answer with exit 75 must give exit 75
and one line; an exit 1, or workers killed by the TERM, must keep torchrun's traceback and root cause.
The Slurm job that needs it is ``test_slurm.py::test_preempted_job_saves_requeues_resumes_and_matches``.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from anndist import launcher
from support import ROOT, child_env

WORKER = ROOT / "tests" / "support" / "scripts" / "launcher_worker.py"
NPROC = 2
QUIET_LINE = "workers preempted (exit 75), torchrun exits 75"


def launch(mode: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """The launcher on NPROC workers in ``mode``; for the ``term*`` modes, TERM it once all are ready."""
    cmd = [sys.executable, "-m", "anndist.launcher", "--standalone", f"--nproc_per_node={NPROC}", str(WORKER)]
    with subprocess.Popen(cmd, cwd=ROOT, env=child_env(MODE=mode), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            stdout = ""
            if mode.startswith("term"):
                while stdout.count("ready ") < NPROC:  # blocks on the workers' output
                    line = proc.stdout.readline()
                    assert line, f"the launcher ended before its workers were ready:\n{proc.stderr.read()}"
                    stdout += line
                proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout + out, err)


@pytest.fixture(scope="module")
def launches() -> dict[str, subprocess.CompletedProcess]:
    return {mode: launch(mode) for mode in ("exit75", "exit1", "term75", "term")}


@pytest.mark.parametrize("mode", ["exit75", "term75"])
def test_workers_that_exit_75_end_the_launcher_quietly_with_75(launches, mode):
    """Every worker exits 75 (also after a TERM passed on to them): one line and exit 75, nothing else."""
    proc = launches[mode]
    assert proc.returncode == 75, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("anndist: node ") and lines[0].endswith(QUIET_LINE), proc.stderr
    for noise in ("Traceback", "ChildFailedError", "death signal", "failed (exitcode", "closing signal"):
        assert noise not in proc.stderr


def test_a_worker_exiting_1_keeps_torchruns_traceback_and_root_cause(launches):
    proc = launches["exit1"]
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" in proc.stderr and "ChildFailedError" in proc.stderr, proc.stderr
    assert "Root Cause" in proc.stderr and "exitcode  : 1 " in proc.stderr, proc.stderr
    assert QUIET_LINE not in proc.stderr


def test_workers_killed_by_the_term_keep_torchruns_traceback(launches):
    """The launcher passed the TERM on and waited: the workers died of it, and torchrun says so."""
    proc = launches["term"]
    assert proc.returncode == 1, proc.stderr
    assert "ChildFailedError" in proc.stderr and "Signal 15 (SIGTERM) received by PID" in proc.stderr, proc.stderr
    assert QUIET_LINE not in proc.stderr


def _failure(rank: int, exitcode: int) -> ProcessFailure:
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="<N/A>")


@pytest.mark.parametrize("codes, expected", [((75, 75), True), ((75,), True), ((75, 1), False),
                                             ((75, -15), False), ((1,), False)])
def test_preempted_only_when_every_failed_worker_exited_75(codes, expected):
    exc = ChildFailedError("train.py", {rank: _failure(rank, code) for rank, code in enumerate(codes)})
    assert launcher.preempted(exc) is expected


def _record(msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord("torch.distributed.elastic.multiprocessing.api", logging.WARNING, __file__, 1,
                             msg, args, None)


def test_torchruns_report_of_a_preemption_is_dropped_and_of_a_crash_kept_in_order(monkeypatch):
    """torchrun TERMs the remaining workers before it logs the failure: held until the failure decides."""
    released = []
    monkeypatch.setattr(launcher.torch_processes.logger, "handle", released.append)
    watch = launcher.PreemptionWatch()
    closing = _record(launcher._CLOSING, 11, "SIGTERM")
    assert not watch.filter(closing) and not released
    assert not watch.filter(_record(launcher._FAILED, 75, 0, 10, "python"))
    assert watch.preempted and not watch.filter(_record(launcher._CLOSING, 12, "SIGTERM"))
    watch.release()
    assert released == []  # a preemption: nothing of it is logged

    crash = launcher.PreemptionWatch()
    assert not crash.filter(closing)
    assert crash.filter(_record(launcher._FAILED, 1, 0, 10, "python"))  # logged, after the held record
    assert released == [closing] and not crash.preempted
    assert crash.filter(_record("anything else"))


def test_sigterm_is_taken_from_torchrun_and_the_rest_kept():
    assert launcher._without_sigterm("SIGTERM,SIGINT,SIGHUP,SIGQUIT") == "SIGINT,SIGHUP,SIGQUIT"
    assert launcher._without_sigterm("SIGUSR1, SIGTERM") == "SIGUSR1"
    assert launcher._without_sigterm("SIGTERM") == "SIGINT"
