"""ProfilingCallback: where each optimizer step's time goes, on every rank, and who is the straggler.

Phases come from the hooks: data wait = previous ``on_batch_end`` to ``on_batch_begin`` (host
time); forward = ``on_batch_begin`` to the end of the module's forward (a forward hook); backward =
from there to ``on_backward_end`` (loss, backward and DDP's all-reduce); optimizer = to
``on_batch_end``. Step time runs from one step's end to the next. On CUDA these marks are CUDA
events read once they have completed, so timing never serialises the GPU; elsewhere they are host
clock readings. At the end of ``fit`` the summaries are gathered and rank 0 prints one table.
With ``profile_memory`` each rank also reports the bytes of model state it holds (``memory.py``:
parameters and optimizer state at the end of ``fit``, gradients at the first optimizer step, when
they all exist): under FSDP its shards, under DDP whole copies, so the table shows what sharding saves.
With ``trace_dir``, a ``torch.profiler`` trace of the ``trace_steps`` window is written per rank.
"""
from __future__ import annotations

import collections
import logging
import os
import socket
import sys
import time
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..dist import collectives
from .memory import gradient_bytes, model_state_bytes
from .base import Callback
from .profile_report import PHASES, format_table, summarize
from .trace import TraceWindow, check_trace_steps

if TYPE_CHECKING:
    from ..trainer import Trainer

logger = logging.getLogger(__name__)


class ProfilingCallback(Callback):
    """Per-step phase timings, p50/p90/max step time, samples/s, peak memory; a table at train end.

    profile_memory: record the peak memory (CUDA max allocated; process peak RSS on CPU), the bytes
        of model state this rank holds (``summaries[r]["model_state"]``), and memory events in the
        trace.
    trace_dir / trace_steps: write ``trace_dir/rank{r}.json`` (Perfetto, chrome://tracing) covering
        the optimizer steps ``start <= step < stop`` of ``trace_steps=(start, stop)`` (default (5, 10)).
        Traced steps are left out of the table's figures (the profiler slows them down).
    """

    def __init__(self, profile_memory: bool = True, trace_dir: str | os.PathLike | None = None,
                 trace_steps: tuple[int, int] | range | None = None) -> None:
        if not isinstance(profile_memory, bool):
            raise TypeError(f"profile_memory must be True or False, got {profile_memory!r}")
        if trace_dir is not None and not isinstance(trace_dir, (str, os.PathLike)):
            raise TypeError(f"trace_dir must be a path (str or os.PathLike) or None, got {trace_dir!r}")
        if trace_steps is not None and trace_dir is None:
            raise ValueError(f"trace_steps={trace_steps!r} needs trace_dir: pass the folder for the rank{{r}}.json traces")
        self.profile_memory = profile_memory
        self.trace_dir = Path(trace_dir) if trace_dir is not None else None
        self.trace_steps = check_trace_steps(trace_steps) if trace_dir is not None else None
        self.summaries: list[dict[str, Any]] = []  # every rank's, after fit (on every rank)
        self.table = ""
        self._hook: Any = None

    # ---------------------------------------------------------------- hooks
    def on_train_begin(self, trainer: "Trainer", logs: dict | None = None) -> None:
        self._clock = _CudaClock() if trainer.device.type == "cuda" else _HostClock()
        self._times = {name: array("d") for name in ("step", "local", *PHASES)}
        self._samples, self._traced = 0, 0
        self._pending: collections.deque[_Step] = collections.deque()
        self._step: _Step | None = None
        self._micro: list[Any] | None = None  # [begin, forward end, backward end] of the open micro-batch
        self._prev_end: Any = None
        self._host_last = time.perf_counter()
        self._grad_bytes: int | None = None
        if self.profile_memory and trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        self._hook = trainer.module.register_forward_hook(self._forward_done)
        self._trace = TraceWindow(self.trace_dir, self.trace_steps, trainer, self.profile_memory) \
            if self.trace_dir is not None else None

    def on_epoch_begin(self, epoch: int, trainer: "Trainer", logs: dict | None = None) -> None:
        self._prev_end = self._clock.mark()  # evaluation and epoch turnover are not a step
        self._host_last = time.perf_counter()

    def on_batch_begin(self, batch_idx: int, trainer: "Trainer", logs: dict | None = None) -> None:
        now = time.perf_counter()
        if self._step is None:
            traced = self._trace is not None and self._trace.step_begins(trainer.global_step)
            self._step = _Step(self._prev_end, traced)
        self._step.data_ms += (now - self._host_last) * 1e3
        self._micro = [self._clock.mark(), None, None]
        self._step.micro.append(self._micro)

    def _forward_done(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._micro is not None and self._micro[2] is None:  # training forward, not evaluation
            self._micro[1] = self._clock.mark()

    def on_backward_end(self, batch_idx: int, trainer: "Trainer", logs: dict | None = None) -> None:
        if self._micro is not None:
            self._micro[2] = self._clock.mark()
            self._micro = None
        if self.profile_memory and self._grad_bytes is None and logs is not None and logs.get("ends_window"):
            # The window's gradients, reduced (sharded under FSDP); the step sets them to None again.
            self._grad_bytes = gradient_bytes(trainer.module.parameters())

    def on_batch_end(self, batch_idx: int, trainer: "Trainer", logs: dict | None = None) -> None:
        step = self._step
        if step is not None:
            step.samples += logs["batch_size"]
            if logs["ends_window"]:
                step.end = self._prev_end = self._clock.mark()
                self._pending.append(step)
                self._step = None
                self._resolve(block=False)
                if self._trace is not None:
                    self._trace.step_ends(trainer.global_step)
        self._host_last = time.perf_counter()

    def on_exception(self, exc: BaseException, trainer: "Trainer", logs: dict | None = None) -> None:
        self._remove_hook()  # no table: other ranks may be gone, so no gather
        if self._trace is not None:
            self._trace.abandon()

    def on_train_end(self, trainer: "Trainer", logs: dict | None = None) -> None:
        self._remove_hook()
        if self._trace is not None:
            self._trace.finish(trainer.global_step, logger)
        self._resolve(block=True)
        mine = summarize(trainer.rank, socket.gethostname(), self._times, self._samples,
                         *self._peak_memory(trainer.device), self._model_state(trainer), self._traced)
        mine["replica"] = trainer.strategy.data.replica  # its samples are another rank's (tensor parallel)
        self.summaries = collectives.all_gather_object(mine)  # every rank is at train end
        self.table = format_table(self.summaries)
        logger.info(self.table)

    # ---------------------------------------------------------------- internals
    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _resolve(self, block: bool) -> None:
        """Turn completed steps' marks into times; with ``block``, wait for the device first."""
        if block and self._pending:
            self._clock.synchronize()
        clock = self._clock
        while self._pending and clock.ready(self._pending[0].end):
            step = self._pending.popleft()
            if step.traced:  # the profiler's own overhead would distort the figures
                self._traced += 1
                continue
            forward = backward = 0.0
            for begin, fwd_end, bwd_end in step.micro:
                fwd_end = fwd_end if fwd_end is not None else bwd_end  # forward hook did not fire
                forward += clock.ms(begin, fwd_end)
                backward += clock.ms(fwd_end, bwd_end)
            total = clock.ms(step.start, step.end)
            times = self._times
            times["step"].append(total)
            times["local"].append(total - backward)
            times["data"].append(step.data_ms)
            times["forward"].append(forward)
            times["backward"].append(backward)
            times["optimizer"].append(clock.ms(step.micro[-1][2], step.end))
            self._samples += step.samples

    def _model_state(self, trainer: "Trainer") -> dict[str, int] | None:
        if not self.profile_memory:
            return None
        state = model_state_bytes(trainer.module, trainer.optimizer)
        state["gradients"] = self._grad_bytes or 0  # none now: the last step zeroed them (to None)
        return state

    def _peak_memory(self, device: torch.device) -> tuple[int | None, str | None]:
        if not self.profile_memory:
            return None, None
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device), "CUDA max allocated"
        try:
            import resource
        except ImportError:  # Windows
            return None, None
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak if sys.platform == "darwin" else peak * 1024), "process peak RSS"


class _Step:
    """The marks of one optimizer step: start (previous step's end), micro-batches, end."""

    __slots__ = ("start", "micro", "end", "data_ms", "samples", "traced")

    def __init__(self, start: Any, traced: bool) -> None:
        self.start, self.micro, self.end, self.data_ms, self.samples = start, [], None, 0.0, 0
        self.traced = traced


class _HostClock:
    mark = staticmethod(time.perf_counter)

    @staticmethod
    def ms(a: float, b: float) -> float:
        return (b - a) * 1e3

    @staticmethod
    def ready(mark: float) -> bool:
        return True

    @staticmethod
    def synchronize() -> None:
        pass


class _CudaClock:
    """Events on the current stream: recording is asynchronous; ``ready`` polls without waiting."""

    @staticmethod
    def mark() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def ms(a: torch.cuda.Event, b: torch.cuda.Event) -> float:
        return a.elapsed_time(b)

    @staticmethod
    def ready(mark: torch.cuda.Event) -> bool:
        return mark.query()

    @staticmethod
    def synchronize() -> None:
        torch.cuda.synchronize()
