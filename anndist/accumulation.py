"""Accumulation windows: which micro-batches end a window, and how each sample is weighted."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch


class Window:
    """Bookkeeping of one accumulation window: loss weights and the end-of-window correction.

    With mean-reduced losses each micro-batch's loss is weighted ``n / (K * B)`` (B the loader's batch
    size), which is exact for full windows; a window holding a different number of samples ``S`` (the
    epoch's last, short one) gets its gradient multiplied by ``K * B / S`` before the step, so every
    sample weighs ``1 / S``. With ``reduction="sum"`` the losses are summed as they are.
    """

    def __init__(self, k: int, sum_reduction: bool, nominal_batch: int | None) -> None:
        self.k, self.weighs, self.nominal = k, not sum_reduction, nominal_batch
        self.samples, self.losses = 0, []

    def weight(self, n: int) -> float:
        if not self.weighs:
            return 1.0
        if self.nominal is None:
            self.nominal = n
        return n / (self.k * self.nominal)

    def add(self, loss: torch.Tensor, n: int) -> None:
        self.samples += n
        self.losses.append(loss)

    def correction(self) -> float:
        if not self.weighs or self.samples == 0:
            return 1.0
        return self.k * self.nominal / self.samples

    def reset(self) -> None:
        self.samples, self.losses = 0, []


def with_last(iterable: Iterable) -> Iterator[tuple[Any, bool]]:
    """Yield ``(item, is_last)``: one item of look-ahead, so a short final window still syncs."""
    iterator = iter(iterable)
    try:
        previous = next(iterator)
    except StopIteration:
        return
    for item in iterator:
        yield previous, False
        previous = item
    yield previous, True
