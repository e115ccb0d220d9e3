"""Mixed precision: the autocast context and, for fp16, the gradient scaler.

bf16 needs no scaler. fp16 uses ``torch.amp.GradScaler`` on CPU and CUDA alike; an overflow makes the
scaler skip the step, and since gradients are all-reduced before the check every rank skips alike.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, ContextManager

import torch

logger = logging.getLogger("anndist")

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_amp_dtype(use_amp: bool, amp_dtype: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this device, or None for full precision."""
    if amp_dtype is not None and amp_dtype not in _DTYPES:
        raise ValueError(f"amp_dtype={amp_dtype!r} is not supported; use 'bf16' or 'fp16' (or None)")
    if not use_amp:
        if amp_dtype is not None:
            raise ValueError(f"amp_dtype={amp_dtype!r} needs use_amp=True")
        return None
    if amp_dtype is not None:
        dtype = _DTYPES[amp_dtype]
    elif device.type == "cuda" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    else:
        dtype = torch.bfloat16
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        logger.warning("bf16 is not supported on %s; training in fp16 with a gradient scaler instead", device)
        dtype = torch.float16
    return dtype


class Precision:
    """Autocast for forward and loss, scaling of the backward pass, and the scaler's state."""

    def __init__(self, dtype: torch.dtype | None, device: torch.device) -> None:
        self.dtype = dtype
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def autocast(self) -> ContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step the optimizer (the scaler may skip it on overflow); return whether it stepped."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        # The scale only shrinks after an overflow, the one case where the step was skipped.
        return self.scaler.get_scale() >= scale_before

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
