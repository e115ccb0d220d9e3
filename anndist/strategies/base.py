"""What every strategy answers: how the model is placed on the ranks, and what follows from that.

A strategy owns, for its way of placing the model:

- the views of the model (``setup``): ``module``, the user's module, whose ``state_dict()`` checkpoints
  hold; ``forward_module``, what evaluation and ``predict`` call (compiled with ``compile=``); and
  ``train_module``, what a training micro-batch calls (the DDP wrapper under DDP); placed in
  torchtitan's order: tensor parallelism (``parallelize``), activation checkpointing, then
  compiling and DDP/FSDP (``place``, in the order each prefers);
- the data each rank reads (``data``: which shard, among how many, and the process group of the sums
  that count samples; ranks of a tensor-parallel group share one shard), and a cheap check that
  ranks sharing a shard read the same batches (``check_batches``);
- the context of a micro-batch that does not end its window (``no_sync``: gradients not reduced);
- how the step's checks are reduced: the non-finite flag (``reduce_found_inf``), the gradient norm
  (``clip_grad_norm``), and whether a bad loss travels inside the gradients (``carries_losses``);
- evaluation batches (``eval_batches``: in lockstep when the forward itself is a collective);
- what a checkpoint holds (``checkpoint_states``: DCP's view of model and optimizer, and whether
  saves are DCP folders);
- how a step's error is told in Trainer terms (``explain``), and what to drop before the process
  group goes (``release``).

The Trainer and the step ask these questions; no other module tests for a kind of model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Iterator, NoReturn

import torch
from torch import nn

from ..checkpoint.sharded import ShardedStates
from ..checkpoint.states import DCPModel, DCPOptimizer
from ..dist.data_layout import DataLayout
from .activation_checkpointing import checkpoint_activations
from .compile import compile_module, split_compiled

if TYPE_CHECKING:
    from ..config import TrainerConfig


class Strategy:
    """One way of placing a model on the ranks (see the module docstring); subclasses fill in ``place``."""

    name = ""
    sharded = False             # each rank holds part of each parameter: the found-inf flag is all-reduced
    carries_losses = False      # a bad loss reaches every rank through the gradient all-reduce (DDP)

    def __init__(self, cfg: "TrainerConfig", device: torch.device, rank: int, world_size: int) -> None:
        self.device, self.rank, self.world_size = device, rank, world_size
        self.compile_options = cfg.compile
        self.activation_checkpointing = cfg.activation_checkpointing
        self.async_checkpoint = cfg.async_checkpoint
        self.module: nn.Module = nn.Module()
        self.forward_module: nn.Module = self.module
        self.train_module: nn.Module = self.module

    @property
    def data(self) -> DataLayout:
        """Which shard of the data this rank reads, among how many, and with whom it sums sample counts."""
        return DataLayout(self.rank, self.world_size)

    @property
    def data_rank(self) -> int:
        """Which shard of the data this rank reads (ranks that share a batch share it)."""
        return self.data.rank

    @property
    def data_world_size(self) -> int:
        """How many different shards of the data the ranks read."""
        return self.data.world_size

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Place ``model`` (the user's module, or one they compiled) and point ``optimizer`` at what trains:
        tensor parallelism, then activation checkpointing, then compiling and DDP/FSDP (torchtitan's order)."""
        module, compiled = split_compiled(model)
        self.module = module.to(self.device)
        self.parallelize(optimizer)
        checkpoint_activations(self.module, self.activation_checkpointing, self.compile_options)
        self.place(optimizer, compiled)

    def parallelize(self, optimizer: torch.optim.Optimizer) -> None:
        """Split layers over tensor-parallel ranks (nothing to split by default)."""

    def check_batches(self, batches: Iterator) -> Iterator:
        """An epoch's batch iterator, checked where ranks must read the same batches (as it is by default)."""
        return batches

    def place(self, optimizer: torch.optim.Optimizer, compiled: nn.Module | None) -> None:
        """Set ``forward_module`` and ``train_module`` (``compiled``: the user's own compiled module)."""
        self.forward_module = self.train_module = compile_module(self.module, self.compile_options, compiled)

    # ------------------------------------------------------------------ the step
    @property
    def no_sync(self) -> Callable[[], ContextManager[Any]] | None:
        """The context of a micro-batch whose gradients are not reduced yet; None: there is nothing to hold back."""
        return None

    def reduce_found_inf(self, found: torch.Tensor) -> None:
        """Make the step's non-finite flag the same on every rank (nothing to do where gradients are whole)."""

    def local_grads(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients as plain tensors this rank holds, for the fused non-finite check."""
        return grads

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """Clip to the global norm of every gradient of the model; return the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def explain(self, exc: RuntimeError) -> NoReturn:
        """Raise ``exc`` told in Trainer terms where the strategy knows better words (DDP's advice)."""
        raise exc

    # ------------------------------------------------------------------ evaluation
    def eval_batches(self, loader: Iterable) -> Iterator[tuple[Any, bool]]:
        """``(batch, counts)``: the loader's batches, each counting (lockstep fillers count nothing)."""
        return ((batch, True) for batch in loader)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_states(self, shared: dict[str, Any], optimizer: torch.optim.Optimizer) -> ShardedStates:
        """DCP's view of model and optimizer. Replicated states stay in ``shared`` too, so a run saves single
        files (or DCP folders with ``async_checkpoint``) and can load either."""
        states = {"model": DCPModel(self.module), "optimizer": DCPOptimizer(self.module, optimizer)}
        return ShardedStates(states, async_save=self.async_checkpoint, saves_folders=self.async_checkpoint)

    # ------------------------------------------------------------------ teardown
    def release(self) -> None:
        """Drop what holds the process group (the DDP wrapper) before the group is destroyed."""
        self.train_module = self.forward_module
