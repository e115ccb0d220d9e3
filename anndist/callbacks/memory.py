"""The bytes of model state one rank holds: its parameters, their gradients and the optimizer's state.

Under ``strategy="fsdp"`` a rank holds its shards (a DTensor's local part), under DDP every rank the
whole tensors, so these figures show what sharding saves, per rank, on any device: the CPU keeps no
allocator statistics, and a process's RSS mixes the model state with everything else. Counted from
the tensors themselves (``numel() * element_size()``).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from ..strategies.dtensor import local


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """The bytes of this rank's part of each tensor in ``tensors`` (anything else is skipped)."""
    parts = [local(t) for t in tensors if isinstance(t, torch.Tensor)]
    return sum(part.numel() * part.element_size() for part in parts)


def gradient_bytes(params: Iterable[torch.nn.Parameter]) -> int:
    """The bytes of this rank's part of the gradients the parameters hold now (those not None)."""
    return tensor_bytes(p.grad for p in params if p.grad is not None)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterable[Any]:
    """Every value of the optimizer's per-parameter state (moments, step counts, ...)."""
    for state in optimizer.state.values():
        yield from state.values()


def model_state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """``{"parameters", "gradients", "optimizer"}``: bytes this rank holds now (gradients: those not None)."""
    params = list(module.parameters())
    return {"parameters": tensor_bytes(params),
            "gradients": gradient_bytes(params),
            "optimizer": tensor_bytes(optimizer_tensors(optimizer))}
