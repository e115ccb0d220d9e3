"""``python -m anndist.launcher``: torchrun that ends a preemption (every worker exits 75) quietly.

Real launches of a tiny worker (``support/scripts/launcher_worker.py``), shared by the tests through one
module-scoped fixture: exit 75 and a SIGTERM that the workers answer with exit 75 must give exit 75
and one line; an exit 1, or workers killed by the TERM, must keep torchrun's traceback and root cause.
The Slurm job that needs it is ``test_slurm.py::test_preempted_job_saves_requeues_resumes_and_matches``;
the launcher's decisions on constructed failures: tests/unit/test_launcher.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

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
