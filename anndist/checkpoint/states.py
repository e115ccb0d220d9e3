"""The model and optimizer as checkpoint entries: whole (one file) or by parameter name (DCP folders).

- ``ModelState``: the user's module's ``state_dict()``; on load, keys saved by a compiled model
  elsewhere (torch.compile's ``_orig_mod.`` prefix) are accepted too, so eager and compiled runs share
  checkpoints.
- ``DCPModel`` / ``DCPOptimizer``: the states DCP saves and loads, each rank its part (its shards where
  the strategy shards, whole tensors where it replicates), keyed by parameter name so that a folder
  reshards onto another world size or layout. ``whole=True`` gives the whole state dicts instead,
  gathered to rank 0 (``Trainer.state_dict()``), see ``whole_states``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

COMPILE_PREFIX = "_orig_mod."


def strip_compile_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with torch.compile's ``_orig_mod.`` taken out of every key (other files' checkpoints)."""
    if not any(COMPILE_PREFIX in key for key in state_dict):
        return state_dict
    return type(state_dict)((key.replace(COMPILE_PREFIX, ""), value) for key, value in state_dict.items())


class ModelState:
    """The model's entry in a single-file checkpoint: the original module's state dict."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> Any:
        return self.module.load_state_dict(strip_compile_prefix(state))


class DCPModel:
    """The model's state for DCP, by parameter name; ``whole=True``: the full state dict (see ``whole_states``)."""

    def __init__(self, module: nn.Module, whole: bool = False) -> None:
        self.module, self.whole = module, whole

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(self.module, options=_whole_options(self.whole, loading=False))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        set_model_state_dict(self.module, state, options=_whole_options(self.whole, loading=True))


class DCPOptimizer:
    """The optimizer's state for DCP, keyed by parameter name (so it reshards with the model); ``whole``: full."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, whole: bool = False) -> None:
        self.module, self.optimizer, self.whole = module, optimizer, whole

    def state_dict(self) -> dict[str, Any]:
        """Its state by name. DCP first gives an optimizer that never stepped its state (one step with lr 0
        and zero gradients); that state is dropped again afterwards, so a save cannot change the run."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        fresh = not self.optimizer.state
        state = get_optimizer_state_dict(self.module, self.optimizer, options=_whole_options(self.whole, loading=False))
        if fresh:
            self.optimizer.state.clear()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        set_optimizer_state_dict(self.module, self.optimizer, state, options=_whole_options(self.whole, loading=True))


def _whole_options(whole: bool, loading: bool) -> Any:
    """DCP's options for a whole state dict: gathered to rank 0 on the CPU; loaded from rank 0's copy."""
    if not whole:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    if not loading:
        return StateDictOptions(full_state_dict=True, cpu_offload=True)
    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())


def whole_states(run: Any) -> dict[str, Any]:
    """The states ``Trainer.state_dict()`` and ``load_state_dict`` use: ``run.states`` (a ``RunState``), with
    model and optimizer as **whole** state dicts where the run keeps them only in DCP folders (sharded).

    Their ``state_dict()`` is then a collective (every rank must call it): the shards are gathered to
    rank 0 on the CPU, and the other ranks get empty dicts (a full copy per rank is the memory sharding
    saves). The model's is the plain ``module.state_dict()`` of the unsharded model (it loads into one);
    the optimizer's is keyed by parameter name, as DCP keys it. ``load_state_dict()`` is collective too:
    rank 0's dicts are broadcast and every rank keeps its part, on any world size; so every rank must
    pass the same keys (what ``state_dict()`` gave it, empty entries included).
    """
    if run.sharded is None or "model" in run.states:  # a replicated run keeps them whole in its states
        return run.states
    model, optimizer = run.sharded.states["model"], run.sharded.states["optimizer"]
    return {"model": DCPModel(model.module, whole=True),
            "optimizer": DCPOptimizer(optimizer.module, optimizer.optimizer, whole=True), **run.states}
