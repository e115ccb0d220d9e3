"""A module fixture's result computed once per test session, however pytest-xdist spreads its tests.

pytest-xdist gives each worker its own module-scoped fixtures, so a fixture that launches processes
(a spawn, torchrun) would launch once per worker that runs one of the module's tests. ``once`` makes
the first worker compute under a file lock in the session's shared temporary folder and save the
result; the others wait for the lock and read it (as tests/test_hf_models.py does for its launch).
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any, Callable

import torch


def once(tmp_path_factory: Any, name: str, compute: Callable[[Path], Any]) -> Any:
    """``compute(folder)`` once per session (``folder``: a fresh folder for its files), its result on every worker."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.getbasetemp().parent / name  # this session's, shared by its workers
        folder.mkdir(exist_ok=True)
    else:
        folder = tmp_path_factory.mktemp(name)
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = folder / "result.pt"
        if not saved.exists():
            torch.save(compute(folder), saved)
        return torch.load(saved, weights_only=False)
