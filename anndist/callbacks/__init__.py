"""Callbacks shipped with anndist. Write your own by subclassing :class:`Callback`."""
from .base import Callback, CallbackError, CallbackList
from .checkpoint import ModelCheckpoint
from .logging import LoggingCallback
from .preemption import PREEMPTED_EXIT_CODE, PreemptionCallback

__all__ = ["Callback", "CallbackError", "CallbackList", "LoggingCallback", "ModelCheckpoint", "PreemptionCallback",
           "PREEMPTED_EXIT_CODE"]
