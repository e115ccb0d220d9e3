"""Launch two-rank jobs of a script as plain processes (torchrun's variables, no agent) and collect exit codes.

The long clean-exit soak, by hand from the repository root: ``python -m tests.support.exit_trials 100``.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time

from .processes import ROOT, child_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_pair(script: str, world_size: int = 2, timeout: float = 120) -> list[int]:
    """Exit codes of one launch of ``script`` on ``world_size`` ranks; every rank's stderr is echoed
    when one of them fails. A launch still running after ``timeout`` seconds is killed and raises."""
    port = str(free_port())
    # stderr goes to files, not pipes: a rank that wrote more than a pipe holds would block, unread.
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(world_size)]
    procs = [subprocess.Popen([sys.executable, script], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=logs[r],
                              env=child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world_size),
                                            LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(world_size)]
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(0.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:  # nothing outlives the launch, on a time-out or an error here
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if codes is None or any(codes):
        for rank, text in enumerate(outputs):
            print(f"--- rank {rank} stderr ---\n{text[-3000:]}", file=sys.stderr)
    if codes is None:
        raise TimeoutError(f"a {world_size}-rank launch of {script} was still running after {timeout:.0f} s; killed")
    return codes


if __name__ == "__main__":
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    script = sys.argv[2] if len(sys.argv) > 2 else str(ROOT / "tests" / "support" / "scripts" / "exit_cleanly.py")
    codes = [launch_pair(script) for _ in range(trials)]
    bad = [c for c in codes if any(code != 0 for code in c)]
    print(f"{trials} two-rank launches of {script}: {len(bad)} with a non-zero exit {bad}")
