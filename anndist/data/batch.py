"""The batch contract: what a loader may yield and how the Trainer reads it.

A batch is either a 2-sequence ``(inputs, targets)`` or a mapping with keys ``"inputs"`` and
``"targets"``. ``inputs`` and ``targets`` are tensors or nested tuples/lists/dicts of tensors; they
are moved to the Trainer's device as they are, and the model is called as ``model(inputs)``. The
batch size is the length of the first dimension of the first tensor found in ``targets``, else in
``inputs``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def split_batch(batch: Any) -> tuple[Any, Any]:
    """Return ``(inputs, targets)`` of ``batch`` or raise a TypeError that says what is accepted."""
    if type(batch) in (tuple, list) and len(batch) == 2:  # the common case first: it runs every batch
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        if "inputs" in batch and "targets" in batch:
            return batch["inputs"], batch["targets"]
        raise TypeError(
            f"a dict batch needs the keys 'inputs' and 'targets', got keys {sorted(map(str, batch))}; "
            "rename them in your Dataset or collate_fn"
        )
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    described = f"{type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise TypeError(
        f"the Trainer cannot split a batch of type {described} into inputs and targets; yield "
        "(inputs, targets) or {'inputs': ..., 'targets': ...} from your DataLoader"
    )


def prepare_batch(batch: Any, device: torch.device, non_blocking: bool = False) -> tuple[Any, Any, int]:
    """``(inputs, targets, batch size)`` of ``batch``, its tensors moved to ``device``."""
    if type(batch) in (tuple, list) and len(batch) == 2:  # split_batch's common case, without the call
        inputs, targets = batch
    else:
        inputs, targets = split_batch(batch)
    if (type(inputs) is torch.Tensor and type(targets) is torch.Tensor and inputs.device == device
            and targets.device == device and targets.dim()):  # the common case, checked in one go
        return inputs, targets, targets.shape[0]
    inputs = to_device(inputs, device, non_blocking)
    targets = to_device(targets, device, non_blocking)
    return inputs, targets, batch_size(inputs, targets)


def to_device(data: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor in a nested tuple/list/dict structure to ``device``."""
    if isinstance(data, torch.Tensor):
        return data if data.device == device else data.to(device, non_blocking=non_blocking)
    if isinstance(data, Mapping):
        return {key: to_device(value, device, non_blocking) for key, value in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(to_device(value, device, non_blocking) for value in data))
    if isinstance(data, (tuple, list)):
        return type(data)(to_device(value, device, non_blocking) for value in data)
    return data


def first_tensor(data: Any) -> torch.Tensor | None:
    if isinstance(data, torch.Tensor):
        return data
    values = data.values() if isinstance(data, Mapping) else data if isinstance(data, (tuple, list)) else ()
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


def batch_size(inputs: Any, targets: Any) -> int:
    """Number of samples in a batch (first dim of the first tensor of targets, else inputs)."""
    tensor = first_tensor(targets)
    if tensor is None or tensor.dim() == 0:
        tensor = first_tensor(inputs)
    if tensor is None or tensor.dim() == 0:
        raise TypeError(
            "cannot tell the batch size: neither targets nor inputs hold a tensor with a batch "
            "dimension; yield tensors whose first dimension is the batch"
        )
    return tensor.shape[0]
