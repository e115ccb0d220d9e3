"""Accumulation windows: which micro-batches end a window, and how each sample or item is weighted.

Two modes, fixed by what the loss step returns:

- **samples** (a loss that is a mean over the batch's samples): each micro-batch's loss is weighted
  ``n / (K * B)`` (B the loader's batch size), which is exact for full windows; a window holding a
  different number of samples ``S`` (the epoch's last, short one) gets its gradient multiplied by
  ``K * B / S`` before the step, so every sample weighs ``1 / S``. With ``reduction="sum"`` the
  losses are summed as they are.
- **items** (``compute_loss`` returns ``(loss, num_items)``): each micro-batch's mean loss is weighted
  by its ``num_items``, so the backward passes add up per-item losses. When the window's last
  micro-batch has its loss, an asynchronous all-reduce of the window's item count starts (it runs
  while that micro-batch's backward does); at the step the gradient is multiplied by ``W / total``:
  after DDP's average over W ranks that is the sum of every item's loss gradient over the window on
  all ranks divided by their total, which is what one large batch computes, however unevenly the
  items fall. One small collective per optimizer step, none per micro-batch. W and the count are
  those of the ranks that read different data: the ranks of a tensor-parallel group train on one
  batch together and count its items once.

With a global batch (``Trainer(global_batch_size=N)``, ``data/global_batch.py``) the sample count of
every window over all ranks is known in advance: N, and for the epoch's last window the samples left.
The correction is then ``N / samples`` of the last window and 1 elsewhere, whichever rank holds how
many of them, so the gradient is the mean over the step's samples on any number of ranks (with
``reduction="sum"``: ``W``, undoing DDP's average, so the gradient is the sum over the step's samples).

The loss-spike guard watching the loss (``spike_guard.py``) needs the window's loss over every rank:
its weighted sum rides in the items' all-reduce, or in one of its own where there is none.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

import torch

from ..dist import collectives


class Window:
    """Bookkeeping of one accumulation window: loss weights and the end-of-window correction."""

    def __init__(self, k: int, sum_reduction: bool, nominal_batch: int | None, world_size: int = 1,
                 group: Any = None, windows: int = 0, last_correction: float = 1.0, sums_loss: bool = False) -> None:
        """``world_size``: the ranks that read different data (the gradient is averaged over them), and
        ``group`` their process group (None: every rank), over which the item count (and the spike guard's
        loss) is summed; ``windows``, ``last_correction``: a global batch's (module docstring)."""
        self.k, self.weighs, self.nominal, self.world_size = k, not sum_reduction, nominal_batch, world_size
        self.group = group
        self.by_items: bool | None = None  # decided by the first micro-batch, then enforced
        self.windows, self.last_correction = windows, last_correction  # a global batch: windows left in the epoch
        self.sums_loss = sums_loss  # the window's loss over every rank is wanted (the spike guard)
        self.reset()

    def add(self, loss: torch.Tensor, n: int, num_items: Any) -> tuple[Any, Any]:
        """Keep a micro-batch's detached loss; return the factor of its loss in the backward pass and
        what it counts for in the epoch's loss (its items, or its n samples)."""
        self.samples += n
        self.losses.append(loss)
        by_items = num_items is not None
        self.counts.append(num_items if by_items else n)
        if self.by_items is None:
            self.by_items = by_items
        elif self.by_items != by_items:
            raise TypeError("compute_loss returned num_items for some micro-batches and not for others; return "
                            "(loss, num_items) always, or a loss alone always")
        if by_items:
            self.items = self.items + num_items
            return num_items, num_items
        if not self.weighs:
            return 1.0, n
        if self.nominal is None:
            self.nominal = n
        return n / (self.k * self.nominal), n

    def count_items(self, device: torch.device) -> None:
        """Start the all-reduce of the window's item count (items mode) and, when ``sums_loss``, of its
        weighted loss sum (before the last backward, which it overlaps)."""
        if not (self.by_items or self.sums_loss):
            return
        count = torch.as_tensor(self.items if self.by_items else self.samples, dtype=torch.float64, device=device)
        if self.sums_loss:
            counts = (torch.tensor(self.counts, dtype=torch.float64, device=device) if not self.by_items else
                      torch.stack([torch.as_tensor(c, dtype=torch.float64, device=device).reshape(()) for c in self.counts]))
            weighted = torch.dot(torch.stack(self.losses).to(device, torch.float64).reshape(-1), counts)
            self._total = torch.stack([count.reshape(()), weighted])
        else:
            self._total = count.reshape(1).clone()
        self._work = collectives.all_reduce_async(self._total, self.group)

    def reduced_loss(self) -> float:
        """The window's loss over every rank (per sample, or per item): after ``count_items`` with ``sums_loss``."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        count, weighted = self._total.tolist()
        return weighted / count if count else math.nan

    def correction(self, where: Callable[[], str]) -> float:
        """The factor the window's gradient is multiplied by before the step."""
        if self.by_items:
            if self._work is not None:
                self._work.wait()
            total = float(self._total[0].item())
            if total <= 0:
                raise ValueError(
                    f"compute_loss returned num_items=0 on every rank for {where()}: there is nothing to average "
                    "over; make sure each window holds items that count (labels other than the ignore index)")
            return self.world_size / total
        if self.windows:  # a global batch: 1 but for the epoch's last window (module docstring)
            self.windows -= 1
            if not self.weighs:
                return float(self.world_size)
            return self.last_correction if self.windows == 0 else 1.0
        if not self.weighs or self.samples == 0:
            return 1.0
        return self.k * self.nominal / self.samples

    def reset(self) -> None:
        self.samples, self.losses, self.counts, self.items = 0, [], [], 0
        self._total = self._work = None


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
