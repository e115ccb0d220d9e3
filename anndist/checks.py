"""Checks of arguments, worded one way wherever they are taken: counts (the Trainer's options, ``fit``'s
plan, ``ModelCheckpoint``), whose error names the argument, the value and what is accepted; and
keyword arguments a function does not take, whose error suggests the closest one ("did you mean")."""
from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Callable, Iterable


def check_count(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    """``value`` must be an int >= ``minimum`` (or None when ``optional``): else TypeError / ValueError."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        accepted = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {accepted}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}" + (" (or None to turn it off)" if optional else ""))


def unknown_options_error(owner: str, unknown: Iterable[str], known: Iterable[str]) -> TypeError:
    """``owner got unknown option(s) 'lr_rate' (did you mean 'lr'?); valid options are [...]``."""
    known = sorted(known)
    hints = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, known, n=1)
        hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    return TypeError(f"{owner} got unknown option(s) {', '.join(hints)}; valid options are {known}")


def check_keywords(fn: Callable) -> Callable:
    """Wrap ``fn`` so that a keyword argument it does not take raises :func:`unknown_options_error`
    (``__init__``: named after its class). Checked per call from the keywords alone: for calls made once
    per run (constructors, ``fit``), never on a per-batch path."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn
    by_name = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    known = [name for name, p in params.items() if name != "self" and p.kind in by_name]

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        unknown = [name for name in kwargs if name not in params]
        if unknown:
            owner = type(args[0]).__name__ if fn.__name__ == "__init__" and args else f"{fn.__qualname__}()"
            raise unknown_options_error(owner, unknown, known)
        return fn(*args, **kwargs)

    checked.__checks_keywords__ = True  # type: ignore[attr-defined]
    return checked
