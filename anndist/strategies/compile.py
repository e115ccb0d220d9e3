"""``Trainer(compile=...)``: torch.compile the bare module before DDP wraps it, and keep checkpoints clean.

The Trainer holds three views of one set of parameters:

- ``module``: the user's model itself. Its ``state_dict()`` is what checkpoints hold, so their keys
  never carry torch.compile's ``_orig_mod.`` prefix: a checkpoint loads into an eager model and into a
  compiled one, and an eager checkpoint resumes a compiled run.
- the compiled module, ``torch.compile(module, **options)`` (the module itself when not compiling):
  what training, evaluation and ``predict`` call.
- ``model``: DDP around the compiled module with several ranks, as PyTorch recommends for DDP
  (compile the bare module, then wrap), else the compiled module.

A model the user compiled already (an ``OptimizedModule``) is taken apart the same way: its original
module is ``module``, and it is the compiled module.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

COMPILE_PREFIX = "_orig_mod."


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


def strip_compile_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with torch.compile's ``_orig_mod.`` taken out of every key (other files' checkpoints)."""
    if not any(COMPILE_PREFIX in key for key in state_dict):
        return state_dict
    return type(state_dict)((key.replace(COMPILE_PREFIX, ""), value) for key, value in state_dict.items())


class ModelState:
    """The model's entry in a checkpoint: the original module's state dict, and on load one whose keys
    may carry ``_orig_mod.`` (saved by a compiled model elsewhere) is accepted too."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> Any:
        return self.module.load_state_dict(strip_compile_prefix(state))


def compiled_graphs() -> int:
    """Frames torch.compile has compiled in this process so far (0 when dynamo keeps no counters)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - a torch without dynamo
        return 0
    return int(counters["frames"]["ok"])
