"""Errors raised inside torch, explained in anndist's terms: what went wrong and the option that fixes it.

DistributedDataParallel's advice names its own keyword arguments, but anndist users never build
the DDP wrapper: the Trainer does, with ``ddp_kwargs``. ``explain_ddp_error`` turns such an error
into one that says what to pass to the Trainer; ``raise_explained`` raises it from a step's ``except``.
"""
from __future__ import annotations

import re
from typing import NoReturn

from torch import nn

_UNUSED_ADVICE = "find_unused_parameters=True"
_UNUSED_INDICES = re.compile(r"Parameter indices which did not receive grad for rank (\d+): ([\d ]+)")
_NAMES_SHOWN = 8


def explain_ddp_error(exc: BaseException, model: nn.Module | None = None) -> Exception | None:
    """A clearer error for ``exc``, raised by DDP in a forward or backward, or None to keep ``exc`` as it is.

    ``model`` (the DDP wrapper or the bare module) lets the message name the parameters that got no
    gradient. The result is a RuntimeError, like DDP's own, for the caller to raise ``from exc``.
    """
    message = str(exc)
    if not isinstance(exc, RuntimeError) or _UNUSED_ADVICE not in message:
        return None
    found = _UNUSED_INDICES.search(message)
    names = _parameter_names(model, found.group(2).split()) if found and model is not None else []
    which = f" on rank {found.group(1)}" if found else ""
    if names:
        more = len(names) - _NAMES_SHOWN
        which += ": " + ", ".join(names[:_NAMES_SHOWN]) + (f" and {more} more" if more > 0 else "")
    return RuntimeError(
        f"some of the model's parameters got no gradient in the last backward pass{which}. If the model "
        "leaves parameters out of some steps on purpose, pass ddp_kwargs={'find_unused_parameters': True} to "
        "the Trainer (each step then costs a little more); if a parameter is never trained, freeze it with "
        "requires_grad_(False) or remove it; if every output should reach the loss, check that they do")


def raise_explained(exc: BaseException, model: nn.Module | None = None) -> NoReturn:
    """Raise ``explain_ddp_error``'s clearer error (from ``exc``), or ``exc`` itself when it has none.

    Called from an ``except`` clause around a step: a ``try`` costs nothing until something raises,
    where a context manager costs two calls on every micro-batch.
    """
    explained = explain_ddp_error(exc, model)
    if explained is None:
        raise exc
    raise explained from exc


def _parameter_names(model: nn.Module, indices: list[str]) -> list[str]:
    """Names of DDP's parameter ``indices``: DDP numbers the trainable parameters it does not ignore."""
    wrapped = isinstance(model, nn.parallel.DistributedDataParallel)
    module = model.module if wrapped else model
    ignored = set(model.parameters_to_ignore) if wrapped else set()
    names = [name for name, param in module.named_parameters() if param.requires_grad and name not in ignored]
    return [names[int(i)] for i in indices if int(i) < len(names)]
