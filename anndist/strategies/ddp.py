"""``strategy="ddp"`` on several ranks: a replica of the model on every rank, gradients all-reduced by
DistributedDataParallel once per accumulation window.

Order, as PyTorch recommends for DDP: compile the bare module, then wrap it; DDP broadcasts rank 0's
weights at construction. A micro-batch that does not end its window runs inside ``no_sync``. Gradients
are whole on every rank and already reduced at the step, so the non-finite flag and the gradient norm
agree without a collective of their own; a loss that is NaN while its gradients are finite reaches
every rank through the gradient all-reduce (``carries_losses``, see step/optimization.py).
"""
from __future__ import annotations

import difflib
import inspect
from typing import TYPE_CHECKING, Any, Callable, ContextManager, NoReturn

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .base import Strategy
from .compile import compile_module
from .ddp_errors import raise_explained

if TYPE_CHECKING:
    from ..config import TrainerConfig

# DDP options the Trainer passes unless ddp_kwargs says otherwise. Gradients as views into DDP's
# all-reduce buckets: after each all-reduce DDP hands the reduced bucket over as the gradients instead
# of copying it back into them, one gradient-sized copy less per optimizer step (timed alone: 4 ms
# for the large benchmark model, whose 2-process CPU step is ~350 ms; bit-identical weights).
# anndist never detaches a reduced gradient, the one thing views forbid;
# ddp_kwargs={"gradient_as_bucket_view": False} restores DDP's own default.
DDP_DEFAULTS = {"gradient_as_bucket_view": True}
_SET_BY_TRAINER = ("module", "device_ids")


class DDPStrategy(Strategy):
    """Replicas on every rank, wrapped in DistributedDataParallel (see the module docstring)."""

    name = "ddp"
    carries_losses = True

    def __init__(self, cfg: "TrainerConfig", device: torch.device, rank: int, world_size: int) -> None:
        super().__init__(cfg, device, rank, world_size)
        self.ddp_kwargs = {**DDP_DEFAULTS, **cfg.ddp_kwargs}

    def place(self, optimizer: torch.optim.Optimizer, compiled: nn.Module | None) -> None:
        self.forward_module = compile_module(self.module, self.compile_options, compiled)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.train_module = DistributedDataParallel(self.forward_module, device_ids=device_ids, **self.ddp_kwargs)

    @property
    def no_sync(self) -> Callable[[], ContextManager[Any]] | None:
        train_module = self.train_module
        return train_module.no_sync if isinstance(train_module, DistributedDataParallel) else None

    def explain(self, exc: RuntimeError) -> NoReturn:
        raise_explained(exc, self.train_module)


def check_ddp_kwargs(ddp_kwargs: Any) -> None:
    """Keys DistributedDataParallel would refuse only once there are two ranks, refused now."""
    if not isinstance(ddp_kwargs, dict):
        raise TypeError(f"ddp_kwargs must be a dict of DistributedDataParallel keyword arguments, got "
                        f"{type(ddp_kwargs).__name__}; e.g. ddp_kwargs={{'find_unused_parameters': True}}")
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return  # a DDP that takes any keyword: nothing to check against
    accepted = [name for name in parameters if name != "self" and name not in _SET_BY_TRAINER]
    for key in ddp_kwargs:
        if key in _SET_BY_TRAINER:
            raise ValueError(f"ddp_kwargs key {key!r} is set by the Trainer (from the model and device=...); "
                             "remove it, and pass device='cuda:N' to choose the GPU")
        if key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TypeError(f"ddp_kwargs key {key!r} is not a parameter of DistributedDataParallel; {hint}"
                            f"it takes {accepted}")
