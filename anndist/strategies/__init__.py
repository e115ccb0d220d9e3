"""How a model is placed on the ranks: one strategy object per way, which the Trainer and the step ask.

- ``SingleDevice`` (one process), ``DDPStrategy`` (replicas, ``strategy="ddp"``, the default) and
  ``FSDPStrategy`` (shards, ``strategy="fsdp"``); with ``tp_size=N`` > 1, ``TensorParallelDDP`` and
  ``TensorParallelFSDP`` (tensor parallelism inside groups of N ranks, replicas or FSDP across them);
  ``base.Strategy`` says what each one answers.
- ``check_strategy_options`` validates a strategy's own options when the Trainer is built (even in one
  process); ``make_strategy`` picks the strategy for the ranks there are.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .base import Strategy
from .ddp import DDPStrategy, check_ddp_kwargs
from .fsdp import FSDPStrategy, check_fsdp_options
from .mesh import check_tp_size
from .single import SingleDevice
from .tensor_parallel import TensorParallelDDP, TensorParallelFSDP

if TYPE_CHECKING:
    from ..config import TrainerConfig

STRATEGIES: dict[str, type[Strategy]] = {"ddp": DDPStrategy, "fsdp": FSDPStrategy}
TENSOR_PARALLEL: dict[str, type[Strategy]] = {"ddp": TensorParallelDDP, "fsdp": TensorParallelFSDP}


def check_strategy_options(strategy: Any, ddp_kwargs: Any, fsdp_kwargs: Any, shard_modules: Any,
                           amp_dtype: Any) -> None:
    """The placement options: a known strategy, and only options that strategy takes, each well formed."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {list(STRATEGIES)}; 'ddp' replicates the model "
                         "on every rank, 'fsdp' shards parameters, gradients and optimizer state across ranks")
    check_ddp_kwargs(ddp_kwargs)
    if STRATEGIES[strategy] is not FSDPStrategy:
        if fsdp_kwargs or shard_modules is not None:
            raise ValueError("fsdp_kwargs and shard_modules apply to strategy='fsdp' only; pass strategy='fsdp' "
                             "or remove them")
        return
    check_fsdp_options(fsdp_kwargs, shard_modules, amp_dtype)


def make_strategy(cfg: "TrainerConfig", device: torch.device, rank: int, world_size: int) -> Strategy:
    """The strategy ``cfg.strategy`` names, for ``world_size`` ranks (DDP in one process: ``SingleDevice``;
    with ``tp_size`` > 1, its tensor-parallel form)."""
    if cfg.tp_size > 1:
        check_tp_size(cfg.tp_size, world_size)
        return TENSOR_PARALLEL[cfg.strategy](cfg, device, rank, world_size)
    cls = STRATEGIES[cfg.strategy]
    if cls is DDPStrategy and world_size == 1:
        cls = SingleDevice
    return cls(cfg, device, rank, world_size)


__all__ = ["DDPStrategy", "FSDPStrategy", "STRATEGIES", "SingleDevice", "Strategy", "TensorParallelDDP",
           "TensorParallelFSDP", "check_strategy_options", "make_strategy"]
