"""DTensor parameters (FSDP's shards, tensor-parallel pieces) read the way each caller needs them.

A plain tensor passes through both functions unchanged, so callers need not ask what they hold.
"""
from __future__ import annotations

import torch


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor; a plain tensor as it is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective on every rank of its mesh); a plain tensor as it is."""
    full = getattr(tensor, "full_tensor", None)
    return full() if full is not None else tensor
