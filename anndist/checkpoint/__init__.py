"""Checkpoints that a crash cannot tear, and exact resumes.

``file.py`` writes and reads one file atomically; ``payload.py`` says what a file holds;
``protocol.py`` saves and loads a run's state objects on every rank; ``folder.py`` keeps a folder of
checkpoints with its ``latest`` pointer. None of them knows the Trainer.
"""
from .file import CheckpointError
from .folder import CheckpointFolder, latest_checkpoint, step_name
from .protocol import RunState, load, save

__all__ = ["CheckpointError", "CheckpointFolder", "RunState", "latest_checkpoint", "load", "save", "step_name"]
