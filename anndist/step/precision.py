"""Mixed precision: the autocast context and, for fp16, the gradient scaler.

bf16 needs no scaler. fp16 uses ``torch.amp.GradScaler`` on CPU and CUDA alike; an overflow makes the
scaler skip the step, and since gradients are all-reduced before the check every rank skips alike.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, ContextManager

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}


def resolve_amp_dtype(use_amp: bool, amp_dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this device, or None for full precision."""
    if amp_dtype is not None and not isinstance(amp_dtype, (str, torch.dtype)):
        raise TypeError(f"amp_dtype must be 'bf16', 'fp16', torch.bfloat16, torch.float16 or None, got "
                        f"{type(amp_dtype).__name__} {amp_dtype!r}")
    if amp_dtype is not None and amp_dtype not in _DTYPES:
        raise ValueError(f"amp_dtype={amp_dtype!r} is not supported; use 'bf16' or 'fp16' (torch.bfloat16 or "
                         "torch.float16), or None for the device's default")
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


_NO_AUTOCAST = contextlib.nullcontext()  # reusable: it holds no state


class Precision:
    """Autocast for forward and loss (when ``dtype`` is set); backward and step as they are."""

    scales_loss = False  # an overflow is expected and handled by skipping the step (fp16 only)

    def __init__(self, dtype: torch.dtype | None, device: torch.device) -> None:
        self.dtype = dtype
        self.device = device

    def autocast(self) -> ContextManager[Any]:
        if self.dtype is None:
            return _NO_AUTOCAST
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients to their true scale before they are checked or clipped."""

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step the optimizer; return whether it stepped."""
        optimizer.step()
        return True

    def skip(self, optimizer: torch.optim.Optimizer) -> None:
        """Record a step that is skipped (a non-finite gradient under ``on_nonfinite="skip"``)."""

    def drop(self, optimizer: torch.optim.Optimizer) -> None:
        """Close a step whose finite gradients are dropped (a loss spike): no optimizer step."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (a checkpoint written with fp16 carries a scaler state that is ignored here)."""


class ScaledPrecision(Precision):
    """fp16: the loss is scaled before backward; an overflow makes the scaler skip the step and back off."""

    scales_loss = True

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(dtype, device)
        self.scaler = torch.amp.GradScaler(device.type)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        # The scale only shrinks after an overflow, the one case where the step was skipped.
        return self.scaler.get_scale() >= scale_before

    def skip(self, optimizer: torch.optim.Optimizer) -> None:
        self.step(optimizer)  # the gradients hold inf/NaN, so the scaler records the skip and backs off

    def drop(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.update()  # the unscaled gradients were finite: the scale grows as after any good step

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)


def make_precision(dtype: torch.dtype | None, device: torch.device) -> Precision:
    """The precision policy for an autocast ``dtype`` (None: full precision)."""
    return ScaledPrecision(dtype, device) if dtype == torch.float16 else Precision(dtype, device)
