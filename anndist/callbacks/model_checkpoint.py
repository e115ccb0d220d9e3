"""ModelCheckpoint: periodic and best-by-metric checkpoints in one folder, pruned, with a ``latest`` pointer."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ..dist import collectives
from ..checkpoint import CheckpointFolder, step_name
from ..checks import check_count
from .base import Callback
from .monitoring import check_monitor, step_mode

if TYPE_CHECKING:
    from ..trainer import Trainer

BEST = "best"


class ModelCheckpoint(Callback):
    """Save checkpoints to ``dirpath`` (default: the Trainer's ``checkpoint_dir``).

    every_n_steps: save ``step-<global step>.ckpt`` after every N-th optimizer step (mid-epoch).
    every_n_epochs: save it at the end of every N-th epoch (None: never).
    keep_last: keep the newest N ``step-*`` checkpoints, delete older ones (None: keep all).
    monitor / mode / save_best: keep ``best.ckpt``, the state with the lowest (``"min"``) or highest
        (``"max"``) value of ``monitor`` (e.g. ``"val_loss"``) over the evaluations of ``fit``: at
        epoch ends, or in step mode (``fit(eval_every_n_steps=N)``) after every N-th step;
        ``save_best`` defaults to True when ``monitor`` is given. Rank 0's verdict is broadcast, so
        all ranks take part in the same saves even if a metric were rank-local.

    In step mode a periodic save that falls on a step with an evaluation waits for it: the checkpoint
    then holds that evaluation (history, the callbacks' counters), and is ``best.ckpt`` too when it won.

    Each save is ``save_in_dir``'s protocol: all ranks call, rank 0 writes atomically, ``latest`` then
    names the new file, so ``fit(resume_from="latest")`` and ``auto_resume`` find it.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, every_n_steps: int | None = None,
                 every_n_epochs: int | None = 1, keep_last: int | None = 3, monitor: str | None = None,
                 mode: str = "min", save_best: bool | None = None) -> None:
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise TypeError(f"dirpath must be a path or None, got {type(dirpath).__name__} {dirpath!r}")
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs),
                            ("keep_last", keep_last)):
            check_count(name, value, 1, optional=True)
        if monitor is not None and not isinstance(monitor, str):
            raise TypeError(f"monitor must be a metric name such as 'val_loss', got {monitor!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r} is not one of ['min', 'max']")
        if save_best is None:
            save_best = monitor is not None
        if save_best and monitor is None:
            raise ValueError("save_best=True needs monitor=...: the epoch metric that decides which checkpoint is best")
        if not (every_n_steps or every_n_epochs or save_best):
            raise ValueError("ModelCheckpoint would never save: set every_n_steps, every_n_epochs or monitor")
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.every_n_steps, self.every_n_epochs, self.keep_last = every_n_steps, every_n_epochs, keep_last
        self.monitor, self.mode, self.save_best = monitor, mode, bool(save_best)
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.last_saved_step = -1
        self._periodic_after_evaluation = False  # step mode: this step's periodic save waits for its evaluation

    def on_train_begin(self, trainer: "Trainer", logs: dict | None = None) -> None:
        if self.dirpath is None:
            if trainer.config.checkpoint_dir is None:
                raise ValueError(
                    "ModelCheckpoint() has no folder: pass ModelCheckpoint(dirpath) or Trainer(checkpoint_dir=...)")
            self.dirpath = Path(trainer.config.checkpoint_dir)
        if self.save_best:
            check_monitor("ModelCheckpoint", self.monitor, trainer, logs)
        self._periodic_after_evaluation = False

    def on_batch_end(self, batch_idx: int, trainer: "Trainer", logs: dict | None = None) -> None:
        # global_step is the same on every rank, so every rank decides alike without a collective.
        step = trainer.global_step
        if (self.every_n_steps and logs and logs.get("ends_window") and step > 0
                and step % self.every_n_steps == 0 and step != self.last_saved_step):
            if logs.get("stepped") and step_mode(trainer) and step % trainer.eval_every_n_steps == 0:
                self._periodic_after_evaluation = True  # the Trainer evaluates right after this hook
                return
            self._save(trainer, periodic=True, best=False)

    def on_evaluate_end(self, trainer: "Trainer", logs: dict | None = None) -> None:
        if (logs or {}).get("when") != "step":
            return
        periodic, self._periodic_after_evaluation = self._periodic_after_evaluation, False
        best = self.save_best and self._improved(trainer, logs, "step evaluation")
        if periodic or best:
            self._save(trainer, periodic, best)

    def on_epoch_end(self, epoch: int, trainer: "Trainer", logs: dict | None = None) -> None:
        periodic = bool(self.every_n_epochs) and (epoch + 1) % self.every_n_epochs == 0
        best = self.save_best and not step_mode(trainer) and self._improved(trainer, logs or {}, "epoch")
        if periodic or best:
            self._save(trainer, periodic, best)

    def _improved(self, trainer: "Trainer", logs: dict, where: str) -> bool:
        if self.monitor not in logs:
            numbers = sorted(k for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            raise ValueError(
                f"monitor={self.monitor!r} is not among this {where}'s metrics {numbers}; pass a val_loader "
                "to fit() for val_* metrics or monitor 'train_loss'")
        score = float(logs[self.monitor])
        better = math.isfinite(score) and (
            self.best_score is None or (score < self.best_score if self.mode == "min" else score > self.best_score))
        better, score = collectives.broadcast_object((better, score))
        if better:
            self.best_score, self.best_step = score, trainer.global_step
        return better

    def _save(self, trainer: "Trainer", periodic: bool, best: bool) -> None:
        """One save: ``step-N.ckpt`` (periodic) or ``best.ckpt``; a periodic save that is also the best
        gets ``best.ckpt`` as a second name. Rank 0 then points ``latest`` at it and prunes."""
        self.last_saved_step = trainer.global_step
        metadata = {"monitor": self.monitor, "best_score": self.best_score} if self.monitor else {}
        CheckpointFolder(self.dirpath).save(
            trainer.run_state, step_name(trainer.global_step) if periodic else BEST, metadata,
            aliases=[BEST] if periodic and best else [], keep_last=self.keep_last if periodic else None)

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_step": self.best_step, "last_saved_step": self.last_saved_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score, self.best_step = state.get("best_score"), state.get("best_step")
        self.last_saved_step = state.get("last_saved_step", -1)


def checkpoint_folder(checkpoint_dir: Path | None, callbacks: Iterable[Callback]) -> Path | None:
    """Where ``resume_from="latest"`` looks: ``checkpoint_dir``, else the one ModelCheckpoint's folder."""
    if checkpoint_dir is not None:
        return Path(checkpoint_dir)
    folders = {Path(cb.dirpath) for cb in callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath}
    return folders.pop() if len(folders) == 1 else None
