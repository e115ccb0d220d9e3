"""The callbacks the Trainer adds on its own, as its options ask."""
from __future__ import annotations

import os
import sys

from .base import CallbackList
from .preemption import PreemptionCallback
from .progress import ProgressBarCallback, progress_bar_wanted


def with_defaults(callbacks: CallbackList, progress_bar: bool | None, handle_signals: bool) -> CallbackList:
    """Append the progress bar, then preemption handling (last, so the other callbacks'
    ``on_train_end`` run before its exit), unless the list already holds them."""
    if progress_bar_wanted(progress_bar, os.environ, sys.stderr, callbacks):
        callbacks.append(ProgressBarCallback())
    if handle_signals and not any(isinstance(cb, PreemptionCallback) for cb in callbacks):
        callbacks.append(PreemptionCallback())
    return callbacks
