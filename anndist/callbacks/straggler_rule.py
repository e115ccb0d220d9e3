"""The live straggler rule, on the figures of one check (the same on every rank after the reduction).

Under DDP every rank waits for the slowest inside backward (the gradient all-reduce), so whole step
times agree across ranks and cannot name the culprit; what differs is the time a rank spends
*outside* that wait: data, the forward passes, the earlier micro-batches' backward, the optimizer
step. A rank is a straggler when that time, its median over the steps since the last check, is
slower than ``threshold`` times the median of the other ranks (``lagging.py``), and the excess costs
the job at least ``min_cost`` of its step time (every other rank waits that long, every step).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

from ..dist.lagging import median_of_others


@dataclass(frozen=True)
class Straggler:
    rank: int
    local_ms: float   # its median time per step outside the gradient wait
    others_ms: float  # the median of the other ranks' local_ms
    step_ms: float    # the job's median step time
    cost: float       # (local_ms - others_ms) / step_ms: the share of each step the others wait for it


def find_stragglers(local_ms: Sequence[float], step_ms: Sequence[float], threshold: float,
                    min_cost: float) -> list[Straggler]:
    """The ranks that lag at this check (see the module docstring); NaN figures (no step timed) never lag."""
    steps = [s for s in step_ms if not math.isnan(s)]
    if len(local_ms) < 2 or not steps:
        return []
    step = statistics.median(steps)
    found = []
    for rank, local in enumerate(local_ms):
        others = median_of_others(local_ms, rank)
        if math.isnan(local) or math.isnan(others) or step <= 0:
            continue
        cost = (local - others) / step
        if local * threshold > others and cost >= min_cost:
            found.append(Straggler(rank, local, others, step, cost))
    return found


def describe(straggler: Straggler, host: str) -> str:
    s = straggler
    return (f"rank {s.rank} on {host} spends {s.local_ms:.2f} ms per step outside the gradient wait, "
            f"{s.local_ms / s.others_ms if s.others_ms else math.inf:.1f}x the median of the other ranks "
            f"({s.others_ms:.2f} ms): every rank waits about {s.local_ms - s.others_ms:.2f} ms "
            f"({s.cost:.0%} of the {s.step_ms:.2f} ms step) for it")
