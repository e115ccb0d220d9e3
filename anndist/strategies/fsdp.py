"""The ``strategy="fsdp"`` side of the Trainer: FSDP2 (``fully_shard``, DTensor parameters).

``shard(module, optimizer, ...)`` shards the module **in place** (FSDP2 changes its class, it adds no
wrapper), so the Trainer's ``model`` and ``module`` are the same object. Which submodules get their
own shard group (their own all-gather and reduce-scatter):

* ``shard_modules=predicate``: every submodule ``m`` (not the root) with ``predicate(m)`` true, the
  deepest first, then the root;
* by default: the root's children, looking through containers (``ModuleList``, ``ModuleDict``,
  ``Sequential``) to their items, that hold at least ``MIN_SHARD_PARAMS`` parameters (the blocks
  of a transformer, a large embedding), then the root.

Before sharding, every rank takes rank 0's parameters and buffers (what DDP does at construction).

``fully_shard`` replaces each parameter by a new DTensor ``Parameter``, so an optimizer built on the
model before the Trainer would hold stale tensors: while it has no state yet (no step taken), its
``param_groups`` are rebound to the sharded parameters by name; an optimizer with state is refused.

Accumulation: ``set_requires_gradient_sync(False)`` on the micro-batches that do not end a window
(``no_gradient_sync``), so gradients are reduce-scattered once per window, as DDP's ``no_sync`` does.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterator

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")
MIN_SHARD_PARAMS = 1_000_000
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def check_options(strategy: Any, fsdp_kwargs: Any, shard_modules: Any, amp_dtype: Any, async_checkpoint: Any) -> None:
    """The strategy options, checked at the Trainer's construction (even in one process)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {list(STRATEGIES)}; 'ddp' replicates the model "
                         "on every rank, 'fsdp' shards parameters, gradients and optimizer state across ranks")
    if not isinstance(fsdp_kwargs, dict):
        raise TypeError(f"fsdp_kwargs must be a dict of fully_shard keyword arguments, got "
                        f"{type(fsdp_kwargs).__name__}; e.g. fsdp_kwargs={{'reshard_after_forward': True}}")
    if shard_modules is not None and not callable(shard_modules):
        raise TypeError(f"shard_modules must be a function module -> bool or None, got "
                        f"{type(shard_modules).__name__}; e.g. shard_modules=lambda m: isinstance(m, Block)")
    if strategy == "ddp" and (fsdp_kwargs or shard_modules is not None):
        raise ValueError("fsdp_kwargs and shard_modules apply to strategy='fsdp' only; pass strategy='fsdp' "
                         "or remove them")
    if not isinstance(async_checkpoint, bool):
        raise TypeError(f"async_checkpoint must be True or False, got {async_checkpoint!r}")
    if strategy != "fsdp":
        return
    from torch.distributed.fsdp import fully_shard
    import inspect
    accepted = set(inspect.signature(fully_shard).parameters) - {"module", "mesh"}
    unknown = sorted(set(fsdp_kwargs) - accepted)
    if unknown:
        raise TypeError(f"fsdp_kwargs key(s) {unknown} are not parameters of fully_shard; it takes {sorted(accepted)} "
                        "(the mesh is the Trainer's)")
    if amp_dtype == torch.float16:
        raise ValueError("strategy='fsdp' with fp16 is not supported (it needs a sharded gradient scaler); "
                         "pass amp_dtype='bf16'")


def shard(module: nn.Module, optimizer: torch.optim.Optimizer, fsdp_kwargs: dict, shard_modules: Callable | None,
          amp_dtype: torch.dtype | None, world_size: int) -> nn.Module:
    """Shard ``module`` in place across the default group and rebind ``optimizer``; one rank: unchanged."""
    if world_size == 1 or not dist.is_initialized():
        return module  # nothing to shard; checkpoints are still DCP folders, loadable on any world size
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kwargs = dict(fsdp_kwargs)
    if amp_dtype is not None and "mp_policy" not in kwargs:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
    names = {id(p): name for name, p in module.named_parameters()}
    _check_optimizer_fresh(optimizer)
    _take_rank0_weights(module)
    for sub in choose_submodules(module, shard_modules):
        fully_shard(sub, **kwargs)
    fully_shard(module, **kwargs)
    _rebind(optimizer, names, dict(module.named_parameters()))
    return module


def choose_submodules(module: nn.Module, shard_modules: Callable | None) -> list[nn.Module]:
    """The submodules that get their own ``fully_shard``, deepest first (see the module docstring)."""
    if shard_modules is not None:
        return [m for _, m in reversed(list(module.named_modules())) if m is not module and shard_modules(m)]
    return [m for m in _through_containers(module)
            if sum(p.numel() for p in m.parameters()) >= MIN_SHARD_PARAMS]


def _through_containers(module: nn.Module) -> Iterator[nn.Module]:
    for child in module.children():
        if isinstance(child, _CONTAINERS):
            yield from _through_containers(child)
        else:
            yield child


def _check_optimizer_fresh(optimizer: torch.optim.Optimizer) -> None:
    if optimizer.state:
        raise ValueError("strategy='fsdp' replaces the model's parameters by sharded ones, and this optimizer has "
                         "already taken steps (it has state for the old parameters); pass an optimizer that has "
                         "not stepped yet, or build it after the Trainer on trainer.module.parameters()")


def _take_rank0_weights(module: nn.Module) -> None:
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def _rebind(optimizer: torch.optim.Optimizer, names: dict[int, str], sharded: dict[str, nn.Parameter]) -> None:
    """Point the optimizer's param_groups at the sharded parameters (same order, found by name)."""
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            name = names.get(id(p))
            if name is None or name not in sharded:
                raise ValueError(f"optimizer parameter {i} of a param group is not a parameter of the model; build "
                                 "the optimizer on model.parameters() of the model you pass to the Trainer")
            params[i] = sharded[name]


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def no_gradient_sync(model: nn.Module, module: nn.Module, sharded: bool) -> ContextManager[Any]:
    """The context of a micro-batch that does not end its window: its gradients are not reduced.

    ``sharded`` is ``is_sharded(module)``, decided once by the caller (it imports FSDP's class);
    otherwise ``model`` is the DDP wrapper (one process needs no context and asks for none).
    """
    if sharded:
        return _no_gradient_sync(module)
    return model.no_sync()


@contextlib.contextmanager
def _no_gradient_sync(module: nn.Module) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor; a plain tensor as it is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective on every rank); a plain tensor as it is."""
    full = getattr(tensor, "full_tensor", None)
    return full() if full is not None else tensor


class ShardedModel:
    """The model's state for DCP: each rank its shards (whole tensors when not sharded: DDP, one
    process), by parameter name.

    ``whole=True``: the full state dict instead (``Trainer.state_dict()``), see ``whole_states``.
    """

    def __init__(self, module: nn.Module, whole: bool = False) -> None:
        self.module, self.whole = module, whole

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(self.module, options=_whole_options(self.whole, loading=False))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        set_model_state_dict(self.module, state, options=_whole_options(self.whole, loading=True))


class ShardedOptimizer:
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
    """The states ``Trainer.state_dict()`` and ``load_state_dict`` use: ``run.states`` (a ``RunState``), and
    under FSDP model and optimizer as **whole** state dicts, which the checkpoint keeps sharded instead.

    Their ``state_dict()`` is a collective (every rank must call it): the shards are gathered to rank 0
    on the CPU, and the other ranks get empty dicts (a full copy per rank is the memory FSDP saves).
    The model's is the plain ``module.state_dict()`` of the unsharded model (it loads into one); the
    optimizer's is keyed by parameter name, as DCP keys it. ``load_state_dict()`` is collective too:
    rank 0's dicts are broadcast and every rank keeps its shard, on any world size; so every rank must
    pass the same keys (what ``state_dict()`` gave it, empty entries included).
    """
    if run.sharded is None or "model" in run.states:  # DDP keeps them whole in its states (sharded_states)
        return run.states
    model, optimizer = run.sharded.states["model"], run.sharded.states["optimizer"]
    return {"model": ShardedModel(model.module, whole=True),
            "optimizer": ShardedOptimizer(optimizer.module, optimizer.optimizer, whole=True), **run.states}


def sharded_states(shared: dict[str, Any], module: nn.Module, optimizer: torch.optim.Optimizer, strategy: str,
                   async_save: bool) -> Any:
    """Model and optimizer as DCP saves them (sharded folders), for either strategy.

    FSDP: they leave the run's ``shared`` states (no rank holds them whole), every save is a folder.
    DDP: they stay in ``shared`` too, so the default run saves single files as ever and can still load
    a folder; with ``async_save`` its saves are folders, each replicated tensor written once.
    """
    from ..checkpoint.sharded import ShardedStates
    states = {"model": ShardedModel(module), "optimizer": ShardedOptimizer(module, optimizer)}
    if strategy == "fsdp":
        del shared["model"], shared["optimizer"]
        return ShardedStates(states, async_save=async_save)
    return ShardedStates(states, async_save=async_save, saves_folders=async_save)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's ``state_dict`` on CPU (gathered from the shards under FSDP): call it on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
