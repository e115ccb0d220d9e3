"""Sharded (DCP) checkpoints under strategy="fsdp" end to end: kill -9 of a torchrun job during
asynchronous saves leaves a loadable checkpoint (the same run under DDP: test_ddp_async_checkpoint.py)."""
from __future__ import annotations

from support.dcp_runs import kill_9_during_async_saves


def test_kill_9_during_async_saves_leaves_a_loadable_checkpoint(tmp_path):
    kill_9_during_async_saves(tmp_path, "fsdp")
