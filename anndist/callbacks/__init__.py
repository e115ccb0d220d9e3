"""Callbacks shipped with anndist. Write your own by subclassing :class:`Callback`."""
from .base import Callback, CallbackError, CallbackList
from .model_checkpoint import ModelCheckpoint
from .early_stopping import EarlyStopping
from .logging import EpochLogCallback, LoggingCallback
from .metrics import MetricsCallback
from .preemption import PREEMPTED_EXIT_CODE, PreemptionCallback
from .profiling import ProfilingCallback
from .progress import ProgressBarCallback
from .stragglers import StragglerCallback
from .tensorboard import TensorBoardCallback
from .trackers import MLflowCallback, WandbCallback

__all__ = ["Callback", "CallbackError", "CallbackList", "EarlyStopping", "EpochLogCallback", "LoggingCallback",
           "MetricsCallback", "MLflowCallback", "ModelCheckpoint", "PreemptionCallback", "PREEMPTED_EXIT_CODE",
           "ProfilingCallback", "ProgressBarCallback", "StragglerCallback", "TensorBoardCallback", "WandbCallback"]
