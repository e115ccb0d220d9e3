"""The closing line of a run: how long it took, how far it got, the best metric, where its files are.

``LoggingCallback`` (or, without one, the Trainer's epoch lines) prints it on rank 0 at the end of
every ``fit``, after every other callback's ``on_train_end`` and a preemption's save, so it is the
log's last line:

    run ended after 12.4s: step 460, 20 epoch(s) | best val_loss 0.0812 at step 437 (runs/ckpt/best.ckpt) |
    checkpoints in runs/ckpt (latest step-000000460.ckpt) | metrics in runs/digits/metrics.jsonl

so that a user looking at the bottom of a log finds the figures and the paths without scrolling.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ..checkpoint import CheckpointFolder
from ..checkpoint.folder import LATEST
from .early_stopping import EarlyStopping
from .model_checkpoint import BEST, ModelCheckpoint

if TYPE_CHECKING:
    from ..trainer import Trainer


def run_summary(trainer: "Trainer", elapsed_s: float, first_step: int, metrics_path: Path | None) -> str:
    """One line: wall time of this ``fit``, optimizer steps (and how many this fit took after a
    resume), complete epochs, the best value of each monitored metric (one per metric, whether
    ``ModelCheckpoint`` or ``EarlyStopping`` tracked it), the checkpoint folders that hold a
    checkpoint, and the metrics file."""
    steps = f"step {trainer.global_step}"
    if first_step:
        steps += f" ({trainer.global_step - first_step} in this run, resumed at step {first_step})"
    parts = [f"run ended after {_duration(elapsed_s)}: {steps}, {trainer.epoch} epoch(s)"]
    parts += best_values(trainer.callbacks)
    checkpointers = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    folders = [trainer.config.checkpoint_dir] + [cb.dirpath for cb in checkpointers]
    written = [_latest(Path(folder)) for folder in dict.fromkeys(str(f) for f in folders if f is not None)]
    if any(written):
        parts.append("checkpoints in " + ", ".join(w for w in written if w))
    if metrics_path is not None:
        parts.append(f"metrics in {metrics_path}")
    return " | ".join(parts)


def best_values(callbacks: Iterable[Any]) -> list[str]:
    """``best <monitor> <value> at step <n>`` once per monitored metric, with ``best.ckpt`` when a
    ``ModelCheckpoint`` kept the weights of that value."""
    found: dict[str, tuple[float, int | None, str, Path | None]] = {}  # monitor -> value, step, mode, file
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor is not None and cb.best_score is not None:
            entry = (cb.best_score, cb.best_step, cb.mode,
                     CheckpointFolder(cb.dirpath).path(BEST) if cb.save_best and cb.dirpath else None)
        elif isinstance(cb, EarlyStopping) and cb.best is not None:
            entry = (cb.best, cb.best_step, cb.mode, None)
        else:
            continue
        monitor = cb.monitor
        if monitor not in found or _better(entry, found[monitor]) or (
                entry[0] == found[monitor][0] and found[monitor][3] is None):
            found[monitor] = entry
    lines = []
    for monitor, (value, step, _, path) in found.items():
        line = f"best {monitor} {value:.4f} at step {step}"
        lines.append(f"{line} ({path})" if path is not None else line)
    return lines


def _better(a: tuple, b: tuple) -> bool:
    return a[0] < b[0] if a[2] == "min" else a[0] > b[0]


def _latest(folder: Path) -> str | None:
    """``folder (latest: name)`` when its ``latest`` pointer exists, else None: nothing was written there."""
    try:
        name = (folder / LATEST).read_text().strip()
    except OSError:
        return None
    return f"{folder} (latest {name})" if name else None


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
