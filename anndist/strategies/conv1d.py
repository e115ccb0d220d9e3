"""Tensor-parallel styles for transformers' ``Conv1D`` (GPT-2's layers): a Linear with its weight transposed.

``Conv1D(nf, nx)`` holds ``weight`` as ``[nx, nf]`` (inputs x outputs, where ``nn.Linear`` holds
outputs x inputs) and computes ``x @ weight + bias``. torch's ``ColwiseParallel`` and
``RowwiseParallel`` split ``nn.Linear`` and ``nn.Embedding`` only; these two split a ``Conv1D`` the
same ways, with the weight's dimensions swapped:

- ``Conv1DColwise``: the output features split (weight ``Shard(1)``, bias ``Shard(0)``), like
  ``ColwiseParallel`` (same arguments: ``output_layouts=Replicate()`` gathers the output);
- ``Conv1DRowwise``: the input features split (weight ``Shard(0)``, bias whole), the partial
  outputs all-reduced, like ``RowwiseParallel`` (``input_layouts=Replicate()`` takes a whole input).

The layer's own forward runs on DTensors (its ``view`` to ``nf`` features is of the global shape),
and the output is handed on as a plain tensor, as torch's styles do with ``use_local_output``.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel


def _split(placements: dict[str, Any], src_data_rank: Any, name: str, module: nn.Module, mesh: Any) -> None:
    for param_name, param in list(module.named_parameters(recurse=False)):
        if param_name not in placements:
            raise ValueError(f"a Conv1D style splits 'weight' and 'bias'; {type(module).__name__} {name!r} also "
                             f"has {param_name!r}")
        tensor = distribute_tensor(param, mesh, [placements[param_name]], src_data_rank=src_data_rank)
        module.register_parameter(param_name, nn.Parameter(tensor, requires_grad=param.requires_grad))


def _check(module: nn.Module, style: str) -> None:
    """A Conv1D: a 2-D weight [nx, nf] (``nf`` its output features); nn.Linear holds its weight the other way."""
    weight = getattr(module, "weight", None)
    if (isinstance(module, (nn.Linear, nn.Embedding)) or weight is None or weight.dim() != 2
            or getattr(module, "nf", None) != weight.shape[1]):
        raise ValueError(f"{style} splits transformers' Conv1D (weight [in_features, out_features]); got a "
                         f"{type(module).__name__}: use 'colwise' / 'rowwise' for nn.Linear and nn.Embedding")


class Conv1DColwise(ColwiseParallel):
    """``ColwiseParallel`` for transformers' ``Conv1D``: each rank computes a slice of the output features."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        _check(module, "Conv1DColwise")
        return distribute_module(
            module, device_mesh, partial(_split, {"weight": Shard(1), "bias": Shard(0)}, self.src_data_rank),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class Conv1DRowwise(RowwiseParallel):
    """``RowwiseParallel`` for transformers' ``Conv1D``: each rank takes a slice of the input features."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        _check(module, "Conv1DRowwise")
        self.desired_input_layouts = (Shard(-1),)
        return distribute_module(
            module, device_mesh, partial(_split, {"weight": Shard(0), "bias": Replicate()}, self.src_data_rank),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))
