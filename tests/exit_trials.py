"""Launch two-rank jobs of a script as plain processes (torchrun's variables, no agent) and collect exit codes."""
from __future__ import annotations

import socket
import subprocess
import sys

from processes import ROOT, child_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_pair(script: str, world_size: int = 2, timeout: float = 120) -> list[int]:
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, script], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world_size),
                                            LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(world_size)]
    return [p.wait(timeout=timeout) for p in procs]


if __name__ == "__main__":
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    script = sys.argv[2] if len(sys.argv) > 2 else str(ROOT / "tests" / "scripts" / "exit_cleanly.py")
    codes = [launch_pair(script) for _ in range(trials)]
    bad = [c for c in codes if any(code != 0 for code in c)]
    print(f"{trials} two-rank launches of {script}: {len(bad)} with a non-zero exit {bad}")
