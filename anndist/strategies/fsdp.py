"""``strategy="fsdp"``: FSDP2 (``fully_shard``) shards parameters, gradients and optimizer state.

Order, as FSDP2 is meant to be used: every rank takes rank 0's weights (what DDP does at
construction), the chosen submodules and then the root are sharded **in place** (FSDP2 changes the
module's class, it adds no wrapper), the optimizer is pointed at the new DTensor parameters, and only
then is the module compiled (``compile=``). Which submodules get their own shard group (their own
all-gather and reduce-scatter):

* ``shard_modules=predicate``: every submodule ``m`` (not the root) with ``predicate(m)`` true, the
  deepest first, then the root;
* by default: the root's children, looking through containers (``ModuleList``, ``ModuleDict``,
  ``Sequential``) to their items, that hold at least ``MIN_SHARD_PARAMS`` parameters (the blocks
  of a transformer, a large embedding), then the root.

``fully_shard`` replaces each parameter by a new DTensor ``Parameter``, so an optimizer built on the
model before the Trainer would hold stale tensors: while it has no state yet (no step taken), its
``param_groups`` are rebound to the sharded parameters by name; an optimizer with state is refused.

Accumulation: ``set_requires_gradient_sync(False)`` on the root module (not on a compiled wrapper,
which is no FSDPModule) for the micro-batches that do not end a window, so gradients are
reduce-scattered once per window, as DDP's ``no_sync`` does. Each rank holds a shard of every
gradient, so the non-finite flag is all-reduced, the gradient norm is the full one, and evaluation
runs in lockstep (every forward all-gathers). Checkpoints are DCP folders, each rank its shards.
One process: nothing is sharded, but checkpoints are still folders, loadable on any world size.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.sharded import ShardedStates
from ..dist import collectives
from ..evaluation.lockstep import lockstep
from .base import Strategy
from .compile import compile_module
from .dtensor import full_value, local

if TYPE_CHECKING:
    from ..config import TrainerConfig

MIN_SHARD_PARAMS = 1_000_000
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


class FSDPStrategy(Strategy):
    """Parameters, gradients and optimizer state sharded across the ranks (see the module docstring)."""

    name = "fsdp"

    def __init__(self, cfg: "TrainerConfig", device: torch.device, rank: int, world_size: int) -> None:
        super().__init__(cfg, device, rank, world_size)
        self.fsdp_kwargs, self.shard_modules, self.amp_dtype = cfg.fsdp_kwargs, cfg.shard_modules, cfg.amp_dtype
        self.sharded = world_size > 1 and collectives.is_initialized()

    def place(self, optimizer: torch.optim.Optimizer, compiled: nn.Module | None) -> None:
        if self.sharded:
            shard(self.module, optimizer, self.fsdp_kwargs, self.shard_modules, self.amp_dtype)
        self.forward_module = self.train_module = compile_module(self.module, self.compile_options, compiled)

    @property
    def no_sync(self) -> Callable[[], ContextManager[Any]] | None:
        return self._no_gradient_sync if self.sharded else None

    @contextlib.contextmanager
    def _no_gradient_sync(self) -> Iterator[None]:
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def reduce_found_inf(self, found: torch.Tensor) -> None:
        if self.sharded:
            collectives.all_reduce(found, dist.ReduceOp.MAX)

    def local_grads(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return [local(grad) for grad in grads] if self.sharded else grads

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        return float(full_value(torch.nn.utils.clip_grad_norm_(params, max_norm)))  # the norm over every shard

    def eval_batches(self, loader: Iterable) -> Iterator[tuple[Any, bool]]:
        return lockstep(loader, self.device) if self.sharded else super().eval_batches(loader)

    def checkpoint_states(self, shared: dict[str, Any], optimizer: torch.optim.Optimizer) -> ShardedStates:
        """Model and optimizer leave the run's shared states (no rank holds them whole): every save is a folder."""
        states = super().checkpoint_states(shared, optimizer).states
        del shared["model"], shared["optimizer"]
        return ShardedStates(states, async_save=self.async_checkpoint, saves_folders=True)


def check_fsdp_options(fsdp_kwargs: Any, shard_modules: Any, amp_dtype: Any) -> None:
    """``fsdp_kwargs`` and ``shard_modules``, checked at the Trainer's construction (even in one process)."""
    if not isinstance(fsdp_kwargs, dict):
        raise TypeError(f"fsdp_kwargs must be a dict of fully_shard keyword arguments, got "
                        f"{type(fsdp_kwargs).__name__}; e.g. fsdp_kwargs={{'reshard_after_forward': True}}")
    if shard_modules is not None and not callable(shard_modules):
        raise TypeError(f"shard_modules must be a function module -> bool or None, got "
                        f"{type(shard_modules).__name__}; e.g. shard_modules=lambda m: isinstance(m, Block)")
    from torch.distributed.fsdp import fully_shard
    accepted = set(inspect.signature(fully_shard).parameters) - {"module", "mesh"}
    unknown = sorted(set(fsdp_kwargs) - accepted)
    if unknown:
        raise TypeError(f"fsdp_kwargs key(s) {unknown} are not parameters of fully_shard; it takes {sorted(accepted)} "
                        "(the mesh is the Trainer's)")
    _check_offload(fsdp_kwargs.get("offload_policy"))
    if amp_dtype == torch.float16:
        raise ValueError("strategy='fsdp' with fp16 is not supported (it needs a sharded gradient scaler); "
                         "pass amp_dtype='bf16'")


def _check_offload(policy: Any) -> None:
    """CPUOffloadPolicy pins its CPU copies by default, which needs an accelerator."""
    if getattr(policy, "pin_memory", False) and not torch.accelerator.is_available():
        raise ValueError("fsdp_kwargs['offload_policy'] is CPUOffloadPolicy(pin_memory=True), which pins host memory "
                         "for copies to an accelerator, and this machine has none; pass CPUOffloadPolicy("
                         "pin_memory=False), or no offload_policy (on the CPU there is nothing to offload to)")


def shard(module: nn.Module, optimizer: torch.optim.Optimizer, fsdp_kwargs: dict, shard_modules: Callable | None,
          amp_dtype: torch.dtype | None, mesh: Any = None, apply: Callable | None = None) -> nn.Module:
    """Shard ``module`` in place and rebind ``optimizer`` (several ranks). ``mesh`` None: across the default
    group, after every rank took rank 0's weights; else across ``mesh`` (the "dp" ranks of a tensor-parallel
    grid, whose weights are already the same). ``apply``: ``fully_shard``, or FSDP2's ``replicate``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    apply = apply or fully_shard
    kwargs = dict(fsdp_kwargs)
    if amp_dtype is not None and "mp_policy" not in kwargs:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
    if mesh is not None:
        kwargs["mesh"] = mesh
    names = parameter_names(module)
    check_optimizer_fresh(optimizer)
    if mesh is None:
        take_rank0_weights(module)
    for sub in choose_submodules(module, shard_modules):
        apply(sub, **kwargs)
    apply(module, **kwargs)
    rebind(optimizer, names, dict(module.named_parameters()))
    return module


def parameter_names(module: nn.Module) -> dict[int, str]:
    """Each parameter's name by identity, taken before a call that replaces the parameters."""
    return {id(p): name for name, p in module.named_parameters()}


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


def check_optimizer_fresh(optimizer: torch.optim.Optimizer) -> None:
    if optimizer.state:
        raise ValueError("strategy='fsdp' replaces the model's parameters by sharded ones, and this optimizer has "
                         "already taken steps (it has state for the old parameters); pass an optimizer that has "
                         "not stepped yet, or build it after the Trainer on trainer.module.parameters()")


def take_rank0_weights(module: nn.Module) -> None:
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def rebind(optimizer: torch.optim.Optimizer, names: dict[int, str], sharded: dict[str, nn.Parameter]) -> None:
    """Point the optimizer's param_groups at the sharded parameters (same order, found by name)."""
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            name = names.get(id(p))
            if name is None or name not in sharded:
                raise ValueError(f"optimizer parameter {i} of a param group is not a parameter of the model; build "
                                 "the optimizer on model.parameters() of the model you pass to the Trainer")
            params[i] = sharded[name]
