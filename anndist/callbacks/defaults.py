"""The callbacks the Trainer adds on its own, as its options ask, and the order they all run in."""
from __future__ import annotations

import os
import sys

from typing import Any, Sequence

from .base import Callback, CallbackList
from .compile_report import CompileReport
from .logging import EpochLogCallback, LoggingCallback
from .model_checkpoint import ModelCheckpoint
from .preemption import PreemptionCallback
from .progress import ProgressBarCallback, progress_bar_wanted
from .watchdog import Watchdog


def build_callbacks(user: Sequence[Callback] | None, cfg: Any, rank: int) -> CallbackList:
    """The user's callbacks, then those the Trainer's options ask for (``cfg``: a TrainerConfig), in
    the order ``run_order`` gives."""
    callbacks = [*(user or ()), *([CompileReport()] if cfg.compile is not None else [])]
    if cfg.watchdog_timeout is not None:
        callbacks.append(Watchdog(cfg.watchdog_timeout, cfg.checkpoint_dir))
    if cfg.log_epochs and not any(isinstance(cb, LoggingCallback) for cb in callbacks):
        callbacks.append(EpochLogCallback())  # a run says how it goes without being asked
    if progress_bar_wanted(cfg.progress_bar, os.environ, sys.stderr, callbacks):
        callbacks.append(ProgressBarCallback())
    if cfg.handle_signals and not any(isinstance(cb, PreemptionCallback) for cb in callbacks):
        callbacks.append(PreemptionCallback())
    return CallbackList(run_order(callbacks), rank=rank)


def run_order(callbacks: Sequence[Callback]) -> list[Callback]:
    """The callbacks in the order given, except that ``ModelCheckpoint`` runs after the others and
    ``PreemptionCallback`` last (a stable sort).

    A checkpoint holds every callback's state as it is when the save happens: saved after the others
    have seen the same evaluation or step (an ``EarlyStopping`` its new best), it resumes them exactly,
    whatever order they were passed in (Lightning runs its checkpoint callbacks last too). The
    preemption's save and exit come after every other callback's ``on_train_end``.
    """
    def late(callback: Callback) -> int:
        return 2 if isinstance(callback, PreemptionCallback) else 1 if isinstance(callback, ModelCheckpoint) else 0
    return sorted(callbacks, key=late)
