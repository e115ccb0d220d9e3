"""A torch.profiler trace of a window of optimizer steps, one Chrome-trace file per rank.

The profiler runs only inside the window (started at its first step, stopped after its last), so
the other steps pay nothing. Each optimizer step is marked ``ProfilerStep#N`` in the trace.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.profiler import ProfilerAction, ProfilerActivity, profile

if TYPE_CHECKING:
    from ..trainer import Trainer

DEFAULT_TRACE_STEPS = (5, 10)


def check_trace_steps(trace_steps: Any) -> tuple[int, int]:
    """``(start, stop)`` optimizer steps (``start <= step < stop``) from a pair, a range or None."""
    if trace_steps is None:
        return DEFAULT_TRACE_STEPS
    if isinstance(trace_steps, range) and trace_steps.step == 1:
        trace_steps = (trace_steps.start, trace_steps.stop)
    ok = (isinstance(trace_steps, (tuple, list)) and len(trace_steps) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in trace_steps))
    if not ok or not 0 <= trace_steps[0] < trace_steps[1]:
        raise ValueError(f"trace_steps={trace_steps!r} must be (start, stop) optimizer steps with "
                         "0 <= start < stop, e.g. (5, 10) or range(5, 10)")
    return int(trace_steps[0]), int(trace_steps[1])


class TraceWindow:
    def __init__(self, trace_dir: Path, steps: tuple[int, int], trainer: "Trainer", profile_memory: bool) -> None:
        self.path = Path(trace_dir) / f"rank{trainer.rank}.json"
        self.start, self.stop = steps
        self.profile_memory = profile_memory
        self.cuda = trainer.device.type == "cuda"
        self.profiler: Any = None
        self.traced: list[int] = []  # optimizer steps inside the trace
        self._current = -1

    def step_begins(self, step: int) -> bool:
        """``step``: optimizer steps taken so far, i.e. the index of the step that begins. True if traced."""
        self._current = step
        if self.profiler is None and not self.traced and self.start <= step < self.stop:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            # A schedule (always record) makes the profiler mark each step as ProfilerStep#N.
            self.profiler = profile(activities=activities, profile_memory=self.profile_memory,
                                    schedule=_always_record)
            self.profiler.step_num = step  # so N is the optimizer step's index
            self.profiler.start()
        return self.profiler is not None

    def step_ends(self, steps_taken: int) -> None:
        if self.profiler is None:
            return
        self.traced.append(self._current)
        if steps_taken >= self.stop:
            self._export()
        else:
            self.profiler.step()

    def finish(self, step: int, logger: logging.Logger) -> None:
        """At train end: write a window cut short by the end of training, or say why there is none."""
        if self.profiler is not None:
            self._export()
        if self.traced:
            logger.info("torch.profiler trace of optimizer steps %d-%d: %s (one rankN.json per rank)",
                        self.traced[0], self.traced[-1], self.path)
        else:
            logger.info("no trace written: training ended at optimizer step %d, before the trace window "
                        "%d-%d", step, self.start, self.stop - 1)

    def abandon(self) -> None:
        """Stop a running profiler without writing (``fit`` raised)."""
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None

    def _export(self) -> None:
        self.profiler.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.profiler.export_chrome_trace(str(self.path))
        self.profiler = None


def _always_record(step: int) -> ProfilerAction:
    return ProfilerAction.RECORD
