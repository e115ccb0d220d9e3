"""The closing line of a run: how long it took, how far it got, the best metric, where its files are.

``LoggingCallback`` prints it (rank 0) at the end of every ``fit``, after the last epoch line:

    run ended after 12.4s: step 460, 20 epoch(s) | best val_loss 0.0812 at step 437 (runs/ckpt/best.ckpt) |
    checkpoints in runs/ckpt | metrics in runs/digits/metrics.jsonl

so that a user looking at the bottom of a log finds the figures and the paths without scrolling.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import CheckpointFolder
from .model_checkpoint import BEST, ModelCheckpoint

if TYPE_CHECKING:
    from ..trainer import Trainer


def run_summary(trainer: "Trainer", elapsed_s: float, first_step: int, metrics_path: Path | None) -> str:
    """One line: wall time of this ``fit``, optimizer steps (and how many this fit took after a
    resume), complete epochs, each ``ModelCheckpoint``'s best monitored value, the checkpoint
    folders and the metrics file."""
    steps = f"step {trainer.global_step}"
    if first_step:
        steps += f" ({trainer.global_step - first_step} in this run, resumed at step {first_step})"
    parts = [f"run ended after {_duration(elapsed_s)}: {steps}, {trainer.epoch} epoch(s)"]
    checkpointers = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    for cb in checkpointers:
        if cb.monitor is not None and cb.best_score is not None:
            best = f"best {cb.monitor} {cb.best_score:.4f} at step {cb.best_step}"
            parts.append(f"{best} ({CheckpointFolder(cb.dirpath).path(BEST)})" if cb.save_best and cb.dirpath else best)
    folders = [trainer.config.checkpoint_dir] + [cb.dirpath for cb in checkpointers]
    folders = list(dict.fromkeys(str(folder) for folder in folders if folder is not None))
    if folders:
        parts.append(f"checkpoints in {', '.join(folders)}")
    if metrics_path is not None:
        parts.append(f"metrics in {metrics_path}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    """``0.42s``, ``12.4s``, ``3m 05s``, ``2h 03m``: precise for short runs, readable for long ones."""
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"
