"""What a checkpoint that cannot be used raises (``file.py`` re-exports both)."""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used; the message names the file and what is wrong with it."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose bytes are not those written (cut short, missing, changed): a resume that
    chose it from a folder falls back to the previous good one."""
