"""A float sum that does not depend on the order or the grouping of its terms.

The epoch's train loss is summed from many small terms, folded in batches whose boundaries move
with checkpoints (a resumed epoch folds at other places than an uninterrupted one). Plain float
addition would make the two ``train_loss`` values differ in the last bits; keeping the sum exact
(Shewchuk's non-overlapping partials, the algorithm of ``math.fsum``) makes them identical.
"""
from __future__ import annotations

import math
from typing import Iterable


class ExactSum:
    """The exact sum of the floats added so far, held as non-overlapping partials; ``value`` rounds once."""

    def __init__(self, partials: Iterable[float] = ()) -> None:
        self.partials: list[float] = []
        self.special = 0.0  # inf and NaN terms: they have no exact partials
        self.add_all(partials)

    def add_all(self, values: Iterable[float]) -> None:
        partials = self.partials
        for x in values:
            if not math.isfinite(x):
                self.special += x
                continue
            i = 0
            for y in partials:
                if abs(x) < abs(y):
                    x, y = y, x
                high = x + y
                low = y - (high - x)
                if low:
                    partials[i] = low
                    i += 1
                x = high
            partials[i:] = [x]

    @property
    def value(self) -> float:
        return math.fsum(self.partials) + self.special
