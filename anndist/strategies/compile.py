"""``Trainer(compile=...)``: which module torch.compile compiles, and a model the user compiled already.

Each strategy compiles where PyTorch recommends for its placement (DDP: the bare module, then the
wrapper; FSDP: after ``fully_shard``); this module says what compiling means:

- the compiled module, ``torch.compile(module, **options)`` (the module itself when not compiling), is
  what training, evaluation and ``predict`` call;
- the user's module itself stays the strategy's ``module``: its ``state_dict()`` is what checkpoints
  hold, so their keys never carry torch.compile's ``_orig_mod.`` prefix (checkpoint/states.py);
- a model the user compiled already (an ``OptimizedModule``) is taken apart the same way: its original
  module is ``module``, and it is the compiled module.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn


def check_compile(value: Any) -> dict[str, Any] | None:
    """``compile=`` as torch.compile keyword arguments, or None for no compiling."""
    if value is False or value is None:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"compile must be True, False or a dict of torch.compile options, got "
                        f"{type(value).__name__} {value!r}; e.g. compile={{'mode': 'max-autotune'}}")
    accepted = [name for name in inspect.signature(torch.compile).parameters if name != "model"]
    unknown = sorted(str(key) for key in value if key not in accepted)
    if unknown:
        raise ValueError(f"compile keys {unknown} are not torch.compile parameters; it takes {accepted}")
    return dict(value)


def split_compiled(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """``(original module, compiled module or None)`` of a model that may be torch.compile'd already."""
    original = getattr(model, "_orig_mod", None)
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) and isinstance(original, nn.Module):
        return original, model
    return model, None


def compile_module(module: nn.Module, options: dict[str, Any] | None, compiled: nn.Module | None) -> nn.Module:
    """What the Trainer calls: ``compiled`` (the user's own), else ``torch.compile(module, **options)``
    when ``options`` is not None, else ``module`` itself."""
    if compiled is not None:
        return compiled
    if options is None:
        return module
    return torch.compile(module, **options)


def compiled_graphs() -> int:
    """Frames torch.compile has compiled in this process so far (0 when dynamo keeps no counters)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - a torch without dynamo
        return 0
    return int(counters["frames"]["ok"])
