"""Which ranks lag: each rank's figure against the median of the *other* ranks' figures.

The pre-flight check (compute speed, link bandwidth) and the live straggler check (step time outside
backward) share this rule. The reference leaves the rank itself out: with two ranks a rank is
compared with the other one, and a slow rank never drags its own reference down (with the plain
median of two, a rank at half speed sits at 0.67x of the median, not 0.5x).
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

SLOW_BELOW = 0.75  # a rank slower than 0.75x the median of the others lags


def median_of_others(values: Sequence[float], index: int) -> float:
    """The median of ``values`` without ``values[index]``, NaNs left out; NaN when nothing is left."""
    others = [v for i, v in enumerate(values) if i != index and not math.isnan(v)]
    return statistics.median(others) if others else math.nan


def versus_others(values: Sequence[float]) -> list[float]:
    """Each value divided by the median of the others (NaN alone, for a NaN, or against a zero median)."""
    ratios = []
    for i, value in enumerate(values):
        reference = median_of_others(values, i)
        ratios.append(value / reference if reference and not math.isnan(reference) else math.nan)
    return ratios


def check_fraction(name: str, value: object) -> float:
    """``value`` as a float in (0, 1), or a ValueError/TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number between 0 and 1, got {type(value).__name__} {value!r}")
    if not 0 < value < 1:
        raise ValueError(f"{name}={value!r} must be between 0 and 1 (exclusive), e.g. {SLOW_BELOW}")
    return float(value)
