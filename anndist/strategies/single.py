"""One process: the model as it is (compiled with ``compile=``), nothing to reduce or hold back."""
from __future__ import annotations

from .base import Strategy


class SingleDevice(Strategy):
    """The model on one device of one process; everything ``Strategy`` does by default."""

    name = "single"
