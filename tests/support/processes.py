"""Start real ``torchrun`` / ``python`` processes for end-to-end tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def torchrun(script: str | Path, *args: str, nproc: int = 2, torchrun_args: tuple[str, ...] = (),
             timeout: float = 240, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N script args``; output captured as text."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *torchrun_args, str(script), *args]
    return _run(cmd, timeout, env, check)


def python(script: str | Path, *args: str, timeout: float = 240, env: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    return _run([sys.executable, str(script), *args], timeout, env, check)


def run(cmd: list[str], timeout: float = 240, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Any command (``bash launch/torchrun.sh ...``) under the same rules as ``torchrun`` and ``python``."""
    return _run([str(part) for part in cmd], timeout, env, check)


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None, check: bool) -> subprocess.CompletedProcess:
    # A session of its own, so that a launch past its time limit is ended with all its processes
    # (torchrun's workers too, which a kill of torchrun alone would leave running on a shared machine).
    with subprocess.Popen(cmd, cwd=ROOT, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            raise AssertionError(f"{' '.join(cmd)} still running after its {timeout:.0f} s limit, killed\n"
                                 f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}") from None
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc
