"""``Trainer(activation_checkpointing=...)``: recompute chosen blocks' activations in the backward pass.

A checkpointed block keeps only its inputs from the forward pass; its backward runs its forward
again (``torch.utils.checkpoint``, non-reentrant, RNG state preserved: dropout draws the same random
numbers the second time), so gradients are those of the run without it, for the memory of one block's
activations at a time.

- ``True``: each block of the model's main ``ModuleList`` (the one holding the most parameters:
  a transformer's layers, e.g. GPT-2's ``transformer.h``, Llama's ``model.layers``); a model without
  a ``ModuleList``: its top-level children.
- a predicate ``fn(module) -> bool``: every submodule it accepts (not the root), outermost only.

How: the block's ``forward`` is replaced, on that one object, by one that runs the original inside
``checkpoint``. The block keeps its class and its place in the model, so parameter names and state
dicts carry no wrapper prefix, and FSDP, tensor parallelism and torch.compile see the same module
tree. The strategy applies it after tensor parallelism and before compiling and FSDP/DDP
(torchtitan's order), see ``base.Strategy.setup``.

Under torch.compile the checkpoint is traced into the graph, where AOTAutograd recomputes the block
with the forward's random numbers (the ``aot_eager`` and ``inductor`` backends). The ``eager``
backend has no AOTAutograd and runs the traced checkpoint wrongly (pytorch#160773: dropout's
gradients differ from the run without it), so with ``compile={"backend": "eager"}`` the checkpointed
blocks run outside the compiled graph (``torch._dynamo.disable``), which that backend loses nothing by.

A transformers model fills a KV cache in its forward when ``config.use_cache`` is on, and the
recomputation would fill it a second time (its attention then sees every key twice): as transformers'
own gradient checkpointing does, the cache is turned off (``config.use_cache = False``, logged).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .compile import split_compiled

_MARK = "_anndist_checkpointed"
logger = logging.getLogger(__name__)


class MainBlocks:
    """The predicate ``activation_checkpointing=True`` stands for: the blocks of one ModuleList (or the
    top-level children), by identity; its repr names them."""

    def __init__(self, model: nn.Module) -> None:
        self.where, blocks = main_blocks(model)
        self.ids = {id(block) for block in blocks}

    def __call__(self, module: nn.Module) -> bool:
        return id(module) in self.ids

    def __repr__(self) -> str:
        return f"MainBlocks({self.where}: {len(self.ids)} blocks)"


def main_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The blocks ``True`` checkpoints: ``(where, blocks)``."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if lists:
        name, found = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
        return f"the items of {name}", list(found)
    return "the top-level children", list(model.children())


def check_activation_checkpointing(model: nn.Module, value: Any) -> Callable[[nn.Module], bool] | None:
    """``activation_checkpointing`` as a predicate over submodules, or None for none."""
    if value is False or value is None:
        return None
    if value is True:
        predicate = MainBlocks(split_compiled(model)[0])
        if not predicate.ids:
            raise ValueError("activation_checkpointing=True found no block to checkpoint: the model has no "
                             "ModuleList and no child modules; pass a predicate fn(module) -> bool")
        return predicate
    if callable(value) and not isinstance(value, nn.Module):
        return value
    raise TypeError(f"activation_checkpointing must be True, False or a function module -> bool, got "
                    f"{type(value).__name__} {value!r}; e.g. activation_checkpointing=lambda m: isinstance(m, Block)")


def checkpoint_activations(module: nn.Module, predicate: Callable[[nn.Module], bool] | None,
                           compile_options: dict[str, Any] | None = None) -> list[str]:
    """Checkpoint the submodules of ``module`` that ``predicate`` accepts (the outermost of nested ones);
    return their names. A block already checkpointed (a second Trainer on the same model) is left as it is.
    ``compile_options``: the Trainer's ``compile=`` (the eager backend keeps the blocks out of the graph)."""
    if predicate is None:
        return []
    outside_graph = compile_options is not None and compile_options.get("backend") == "eager"
    chosen: list[str] = []
    for name, sub in module.named_modules():
        if sub is module or any(name.startswith(outer + ".") for outer in chosen) or not predicate(sub):
            continue
        chosen.append(name)
        if not getattr(sub.forward, _MARK, False):
            sub.forward = _checkpointed(sub.forward, outside_graph)
    if not chosen:
        raise ValueError("activation_checkpointing's predicate accepted no submodule of the model (the root does "
                         "not count); check what it tests, e.g. lambda m: isinstance(m, MyBlock)")
    config = getattr(module, "config", None)
    if getattr(config, "use_cache", False) is True:
        config.use_cache = False
        logger.info("activation checkpointing: %s.config.use_cache set to False (a recomputed block would fill its "
                    "KV cache twice)", type(module).__name__)
    return chosen


def _checkpointed(forward: Callable[..., Any], outside_graph: bool) -> Callable[..., Any]:
    def forward_recomputed(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

    if outside_graph:
        forward_recomputed = torch._dynamo.disable(forward_recomputed)
    setattr(forward_recomputed, _MARK, True)
    return forward_recomputed
