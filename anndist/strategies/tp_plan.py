"""``Trainer(tp_size=N, tp_plan=...)``: which submodules tensor parallelism splits, and how.

A plan maps submodule names, or patterns of them (``"layers.*.mlp.up_proj"``: ``*`` and the other
``fnmatch`` wildcards match within one dotted part, as ``parallelize_module`` matches them), to a
style: ``"colwise"`` (``ColwiseParallel``: the output features split over the tensor-parallel ranks,
the output left sharded on its last dimension), ``"rowwise"`` (``RowwiseParallel``: the input
features split, the partial outputs all-reduced), or any torch ``ParallelStyle`` object. The string
styles apply to ``nn.Linear`` and ``nn.Embedding``; other layers take a ``ParallelStyle`` that knows
them (``conv1d.py`` has transformers' ``Conv1D``).

Without ``tp_plan``, a model that carries its own plan is split by it: transformers' models keep it
as ``model._tp_plan`` (full names, e.g. ``{"model.layers.*.self_attn.q_proj": "colwise", ...}``), and its
style names are translated here to torch's styles (``MODEL_STYLES``); a style with no translation is
an error that names it. The plan is resolved once, when the Trainer is built, into exact submodule
names, so a name that matches nothing is reported before anything starts.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable

import torch
from torch import nn

from ..checks import check_count
from .compile import split_compiled

SPLITTABLE = (nn.Linear, nn.Embedding)  # what torch's ColwiseParallel and RowwiseParallel split


def _styles() -> dict[str, Callable[[], Any]]:
    """The user's style names: a fresh torch ParallelStyle each (a style object may keep per-module state)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    return {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def _model_styles() -> dict[str, Callable[[], Any]]:
    """transformers' style names, as torch's styles that do the same (``transformers.distributed``'s registry)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    gathered = lambda: ColwiseParallel(output_layouts=Replicate())  # noqa: E731
    whole_input = lambda: RowwiseParallel(input_layouts=Replicate())  # noqa: E731
    return {"colwise": ColwiseParallel, "rowwise": RowwiseParallel, "colwise_rep": gathered,
            "colwise_gather_output": gathered, "rowwise_rep": whole_input, "rowwise_split_input": whole_input,
            "embedding_rowwise": whole_input, "embedding_colwise": gathered}


def check_tp_options(model: nn.Module, tp_size: Any, tp_plan: Any, amp_dtype: Any,
                     ddp_kwargs: dict) -> dict[str, Any] | None:
    """``tp_size`` and ``tp_plan`` checked against ``model``; the plan by exact submodule name (None: no TP)."""
    check_count("tp_size", tp_size, minimum=1)
    if tp_size == 1:
        if tp_plan is not None:
            raise ValueError("tp_plan is given but tp_size=1: pass tp_size=N (the ranks that split each layer, "
                             "e.g. tp_size=2) to use tensor parallelism, or remove tp_plan")
        return None
    if amp_dtype == torch.float16:
        raise ValueError(f"tp_size={tp_size} with fp16 is not supported (its gradient scaler does not handle "
                         "split gradients); pass amp_dtype='bf16'")
    if ddp_kwargs:
        raise ValueError(f"ddp_kwargs={ddp_kwargs!r} configure DistributedDataParallel, which tensor parallelism "
                         "does not use (its data-parallel replicas are kept by FSDP2's replicate); remove them")
    module = split_compiled(model)[0]
    if tp_plan is None:
        return resolve_plan(module, *_model_plan(module, tp_size))
    if not isinstance(tp_plan, dict) or not tp_plan:
        raise TypeError(f"tp_plan must be a non-empty dict of submodule name (or pattern) -> 'colwise', 'rowwise' "
                        f"or a ParallelStyle, got {type(tp_plan).__name__} {tp_plan!r}; e.g. "
                        "tp_plan={'fc1': 'colwise', 'fc2': 'rowwise'}")
    return resolve_plan(module, tp_plan, _styles(), "tp_plan")


def _model_plan(module: nn.Module, tp_size: int) -> tuple[dict[str, Any], dict[str, Callable[[], Any]], str]:
    plan = getattr(module, "_tp_plan", None)
    if not plan:
        raise ValueError(f"tp_size={tp_size} needs a plan of what to split, and {type(module).__name__} carries none "
                         "(no _tp_plan); pass tp_plan={'<linear layer>': 'colwise', '<next linear layer>': "
                         "'rowwise', ...} (see docs/parallelism.md)")
    return dict(plan), _model_styles(), f"the model's own plan ({type(module).__name__}._tp_plan)"


def resolve_plan(module: nn.Module, plan: dict[Any, Any], styles: dict[str, Callable[[], Any]],
                 source: str) -> dict[str, Any]:
    """``{exact submodule name: ParallelStyle}`` for ``plan``, with an error naming the entry that is wrong."""
    from torch.distributed.tensor.parallel import ParallelStyle
    modules = dict(module.named_modules())
    resolved: dict[str, Any] = {}
    for pattern, style in plan.items():
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"{source}: key {pattern!r} must be a submodule name or pattern (a non-empty string)")
        if not isinstance(style, (str, ParallelStyle)):
            raise TypeError(f"{source}[{pattern!r}] must be 'colwise', 'rowwise' or a torch ParallelStyle, got "
                            f"{type(style).__name__} {style!r}")
        if isinstance(style, str) and style not in styles:
            raise ValueError(f"{source}[{pattern!r}] = {style!r} is not a style anndist knows ({sorted(styles)}); "
                             "pass tp_plan= with a torch ParallelStyle for it (see docs/parallelism.md)")
        names = [name for name in modules if name and _matches(name, pattern)]
        if not names:
            raise ValueError(_no_match(module, pattern, source))
        for name in names:
            if name in resolved:
                raise ValueError(f"{source}: submodule {name!r} is matched by two entries (one of them {pattern!r}); "
                                 "give each submodule one style")
            if isinstance(style, str) and not isinstance(modules[name], SPLITTABLE):
                raise ValueError(
                    f"{source}[{pattern!r}] = {style!r} splits nn.Linear and nn.Embedding layers, and {name!r} is a "
                    f"{type(modules[name]).__name__}; pass a ParallelStyle that splits it (for transformers' Conv1D: "
                    "anndist.Conv1DColwise / Conv1DRowwise)")
            resolved[name] = styles[style]() if isinstance(style, str) else style
    return resolved


def _matches(name: str, pattern: str) -> bool:
    """Each dotted part of ``name`` matches the same part of ``pattern`` (``*`` never crosses a dot)."""
    parts, wanted = name.split("."), pattern.split(".")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))


def _no_match(module: nn.Module, pattern: str, source: str) -> str:
    names = [name for name, _ in module.named_modules() if name]
    params = [name for name, _ in module.named_parameters()]
    if any(_matches(name, pattern) for name in params):
        return (f"{source}: {pattern!r} names parameters, not submodules; a plan maps submodules (the layers that "
                "own the parameters) to styles")
    close = difflib.get_close_matches(pattern, names, n=3)
    hint = f"; did you mean {close}?" if close else f"; its submodules include {names[:8]}"
    return f"{source}: {pattern!r} matches no submodule of {type(module).__name__}{hint}"
