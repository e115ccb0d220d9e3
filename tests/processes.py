"""Start real ``torchrun`` / ``python`` processes for end-to-end tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None, check: bool) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc
