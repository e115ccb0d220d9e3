"""``tp_size=N``: tensor parallelism inside groups of N consecutive ranks, data parallelism across them.

The ranks form a ``(dp, tp)`` grid (``mesh.py``). The model is placed in torchtitan's order:

1. every rank takes rank 0's weights, and ``parallelize_module`` splits the plan's layers over the
   "tp" ranks (``tp_plan.py``); the optimizer is pointed at the split parameters;
2. activation checkpointing (``activation_checkpointing.py``, by ``Strategy.setup``);
3. data parallelism over the "dp" ranks: ``TensorParallelFSDP`` (``strategy="fsdp"``) shards each
   parameter further with ``fully_shard(mesh=dp)`` (2-D, FSDP x TP); ``TensorParallelDDP`` (the
   default strategy) keeps replicas with FSDP2's ``replicate(mesh=dp)``, gradients all-reduced over
   "dp". ``DistributedDataParallel`` takes no DTensor parameters (torch 2.13: "c10d.broadcast_ does
   not have a sharding strategy"), and torch's ``_pre_dp_module_transform`` for it loses the
   parameters after a forward, so DDP over TP is ``replicate``: the same all-reduce, DTensor-aware.
   With dp = 1 there is nothing to replicate and the model is tensor parallel only;
4. torch.compile, as FSDP does (after the data-parallel call).

What follows from the split: gradients are reduced once per window (``set_requires_gradient_sync``);
each rank holds part of some gradients, so the non-finite flag is all-reduced over every rank and the
norm is the whole model's (``grad_norm.py``, any mix of meshes); the forward is a collective, so
evaluation runs in lockstep; checkpoints are DCP folders (each rank its parts), which reshard onto
any other layout. The ranks of a tensor-parallel group read the same batches: the data layout is
the "dp" dimension's (``data``), and the first batch of each epoch is compared across each group.
"""
from __future__ import annotations

import hashlib
import itertools
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from ..dist import collectives
from ..dist.data_layout import DataLayout
from .compile import compile_module
from .fsdp import FSDPStrategy, check_optimizer_fresh, parameter_names, rebind, shard, take_rank0_weights
from .grad_norm import clip_grad_norm
from .mesh import Grid

if TYPE_CHECKING:
    from ..config import TrainerConfig

_END = object()


class TensorParallelFSDP(FSDPStrategy):
    """``strategy="fsdp", tp_size=N``: FSDP over "dp" x tensor parallelism over "tp" (see the module docstring)."""

    name = "fsdp"

    def __init__(self, cfg: "TrainerConfig", device: torch.device, rank: int, world_size: int) -> None:
        super().__init__(cfg, device, rank, world_size)
        self.grid = Grid(device.type, world_size, cfg.tp_size)
        self.tp_plan: dict[str, Any] = dict(cfg.tp_plan or {})
        self.sharded = True  # part of some parameters on each rank, whatever dp is
        self.reduces = False  # set by place: whether gradients are reduced over "dp" (the no-sync context)

    @property
    def data(self) -> DataLayout:
        return self.grid.data

    def parallelize(self, optimizer: torch.optim.Optimizer) -> None:
        from torch.distributed.tensor.parallel import parallelize_module
        names = parameter_names(self.module)
        check_optimizer_fresh(optimizer)
        take_rank0_weights(self.module)
        parallelize_module(self.module, self.grid.tp, self.tp_plan)
        rebind(optimizer, names, dict(self.module.named_parameters()))

    def place(self, optimizer: torch.optim.Optimizer, compiled: nn.Module | None) -> None:
        apply = self.data_parallel()
        if apply is not None:
            shard(self.module, optimizer, self.fsdp_kwargs, self.shard_modules, self.amp_dtype, self.grid.dp, apply)
            self.reduces = True
        self.forward_module = self.train_module = compile_module(self.module, self.compile_options, compiled)

    def data_parallel(self) -> Callable | None:
        """The call that spreads the model over the "dp" ranks (None: none)."""
        from torch.distributed.fsdp import fully_shard
        return fully_shard

    @property
    def no_sync(self) -> Callable[[], Any] | None:
        return self._no_gradient_sync if self.reduces else None

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        return clip_grad_norm([p.grad for p in params if p.grad is not None], max_norm)

    def check_batches(self, batches: Iterator) -> Iterator:
        first = next(batches, _END)
        check_same_batches(None if first is _END else fingerprint(first), self.data.rank)
        return batches if first is _END else itertools.chain((first,), batches)


class TensorParallelDDP(TensorParallelFSDP):
    """``tp_size=N`` with the default strategy: replicas over "dp" (FSDP2's ``replicate``) x tensor parallelism."""

    name = "ddp"

    def data_parallel(self) -> Callable | None:
        if self.grid.dp_size == 1:
            return None
        from torch.distributed._composable.replicate_with_fsdp import replicate
        return replicate


def fingerprint(batch: Any) -> str:
    """A digest of a batch's tensors (shapes, dtypes, bytes) and other leaves."""
    digest = hashlib.blake2b(digest_size=16)

    def add(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                digest.update(str(key).encode())
                add(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(item)
        else:
            digest.update(repr(value).encode())

    add(batch)
    return digest.hexdigest()


def check_same_batches(mine: str | None, data_rank: int) -> None:
    """Every rank raises when the ranks reading one data shard (a tensor-parallel group) got different first
    batches: they compute one batch together, so different data would train on a mix of the two."""
    seen = collectives.all_gather_object((data_rank, mine))
    groups: dict[int, list[tuple[int, str | None]]] = {}
    for rank, (data_shard, digest) in enumerate(seen):
        groups.setdefault(data_shard, []).append((rank, digest))
    for data_shard, members in groups.items():
        if len({digest for _, digest in members}) > 1:
            ranks = [rank for rank, _ in members]
            raise ValueError(
                f"ranks {ranks} form one tensor-parallel group (data-parallel rank {data_shard}) and read different first "
                "batches this epoch; the ranks of a tensor-parallel group compute on one batch together, so their "
                "loaders must yield the same batches: build a per-rank loader from trainer.strategy.data_rank "
                "(rank // tp_size) and data_world_size, not from the rank, or pass a DataLoader anndist shards")
