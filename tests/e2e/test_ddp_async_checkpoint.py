"""Asynchronous checkpoints under strategy="ddp" end to end: kill -9 of a torchrun job during asynchronous
saves leaves a loadable checkpoint (the FSDP run's test, support/dcp_runs.py, with strategy="ddp")."""
from __future__ import annotations

from support.dcp_runs import kill_9_during_async_saves


def test_kill_9_during_ddp_async_saves_leaves_a_loadable_checkpoint(tmp_path):
    kill_9_during_async_saves(tmp_path, "ddp")
