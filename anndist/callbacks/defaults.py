"""The callbacks the Trainer adds on its own, as its options ask."""
from __future__ import annotations

import os
import sys

from typing import Any, Sequence

from .base import Callback, CallbackList
from .compile_report import CompileReport
from .logging import EpochLogCallback, LoggingCallback
from .preemption import PreemptionCallback
from .progress import ProgressBarCallback, progress_bar_wanted
from .watchdog import Watchdog


def build_callbacks(user: Sequence[Callback] | None, cfg: Any, rank: int) -> CallbackList:
    """The user's callbacks, then those the Trainer's options ask for (``cfg``: a TrainerConfig)."""
    extra = [CompileReport()] if cfg.compile is not None else []
    callbacks = CallbackList([*(user or ()), *extra], rank=rank)
    if cfg.watchdog_timeout is not None:  # before the defaults: it stops before a preemption's final save
        callbacks.append(Watchdog(cfg.watchdog_timeout, cfg.checkpoint_dir))
    if cfg.log_epochs and not any(isinstance(cb, LoggingCallback) for cb in callbacks):
        callbacks.append(EpochLogCallback())  # a run says how it goes without being asked
    return with_defaults(callbacks, cfg.progress_bar, cfg.handle_signals)


def with_defaults(callbacks: CallbackList, progress_bar: bool | None, handle_signals: bool) -> CallbackList:
    """Append the progress bar, then preemption handling (last, so the other callbacks'
    ``on_train_end`` run before its exit), unless the list already holds them."""
    if progress_bar_wanted(progress_bar, os.environ, sys.stderr, callbacks):
        callbacks.append(ProgressBarCallback())
    if handle_signals and not any(isinstance(cb, PreemptionCallback) for cb in callbacks):
        callbacks.append(PreemptionCallback())
    return callbacks
