"""Callbacks shipped with anndist. Write your own by subclassing :class:`Callback`."""
from .base import Callback, CallbackError, CallbackList
from .checkpoint import ModelCheckpoint
from .logging import LoggingCallback
from .metrics import MetricsCallback
from .profiling import ProfilingCallback
from .progress import ProgressBarCallback
from .tensorboard import TensorBoardCallback

__all__ = ["Callback", "CallbackError", "CallbackList", "LoggingCallback", "MetricsCallback", "ModelCheckpoint",
           "ProfilingCallback", "ProgressBarCallback", "TensorBoardCallback"]
