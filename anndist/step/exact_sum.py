"""A float sum that does not depend on the order or the grouping of its terms.

The epoch's train loss is summed from many small terms, folded in batches whose boundaries move
with checkpoints (a resumed epoch folds at other places than an uninterrupted one). Plain float
addition would make the two ``train_loss`` values differ in the last bits; keeping the sum exact
makes them identical. The exact sum is held as non-overlapping floats ``partials`` whose exact sum
it is: ``math.fsum`` rounds an exact sum correctly, so the largest partial is ``fsum`` of all the
terms, the next one ``fsum`` of what is left, and so on until nothing is (two or three passes of
``fsum``, in C, per batch of terms).
"""
from __future__ import annotations

import math
from typing import Iterable


class ExactSum:
    """The exact sum of the floats added so far; ``value`` rounds it once."""

    def __init__(self, partials: Iterable[float] = ()) -> None:
        self.partials: list[float] = []
        self.special = 0.0  # inf and NaN terms: they have no exact sum
        self.add_all(partials)

    def add_all(self, values: Iterable[float]) -> None:
        terms = [*self.partials, *values]
        if not math.isfinite(sum(terms)):  # an inf or NaN term, or finite terms past float's range
            self.special += sum(x for x in terms if not math.isfinite(x))
            terms = [x for x in terms if math.isfinite(x)]
        partials: list[float] = []
        while True:
            try:
                rest = math.fsum([*terms, *(-p for p in partials)])  # the exact remainder, rounded
            except OverflowError:  # an exact sum past 1.8e308: it is infinite as a float
                self.special += math.copysign(math.inf, sum(terms))
                partials = []
                break
            if rest == 0.0:  # exactly: every term is a multiple of 2**-1074, so is any non-zero remainder
                break
            partials.append(rest)
        self.partials = partials

    @property
    def value(self) -> float:
        return math.fsum(self.partials) + self.special
