"""Checks of count arguments, worded one way wherever they are taken (the Trainer's options, ``fit``'s
plan, ``ModelCheckpoint``): the error names the argument, the value and what is accepted."""
from __future__ import annotations

from typing import Any


def check_count(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    """``value`` must be an int >= ``minimum`` (or None when ``optional``): else TypeError / ValueError."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        accepted = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {accepted}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}" + (" (or None to turn it off)" if optional else ""))
