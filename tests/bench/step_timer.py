"""The benchmarks' clock of optimizer steps: a callback that stamps the end of each window and stops the
run after ``steps`` optimizer steps (the workers of bench_accumulation.py and bench_shape.py)."""
from __future__ import annotations

import time

from anndist import Callback


class StepTimer(Callback):
    def __init__(self, steps: int) -> None:
        self.steps, self.stamps = steps, []

    def on_batch_end(self, batch_idx, trainer, logs=None):
        if logs["ends_window"]:
            self.stamps.append(time.perf_counter())
            if trainer.global_step >= self.steps:
                trainer.stop_training = True

    def gaps(self, skip: int) -> list[float]:
        """Seconds between consecutive steps, the first ``skip`` gaps (the warm-up) left out."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])][skip:]
