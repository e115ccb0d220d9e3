"""Callbacks shipped with anndist. Write your own by subclassing :class:`Callback`."""
from .base import Callback, CallbackError, CallbackList
from .checkpoint import ModelCheckpoint
from .logging import LoggingCallback

__all__ = ["Callback", "CallbackError", "CallbackList", "LoggingCallback", "ModelCheckpoint"]
