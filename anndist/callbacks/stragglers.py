"""StragglerCallback: the straggler rule while training, with an action (warn, or checkpoint and exit 75).

Per optimizer step each rank takes three clock readings: the end of the window's last forward (a
forward hook), the end of its backward (``on_backward_end``), the end of the step (``on_batch_end``).
Its *local* time is the step minus that last backward, i.e. everything but the gradient all-reduce
where it waits for the others. Every ``every_n_steps`` steps (else about every ``every_s`` seconds,
the step count agreed in the check itself) the ranks run one SUM all-reduce of a vector holding, in
its own slots, each rank's median local and step time since the last check: every rank then holds
the same figures and reaches the same verdict (``straggler_rule.py``). A rank that lags ``patience``
checks in a row is a straggler: ``action="warn"`` logs it on rank 0; ``action="exit"`` stops every
rank at the same step (``stop_training``, the Trainer's agreement), saves a checkpoint through the
normal save path in ``checkpoint_dir`` (the run resumes exactly), and on SLURM rank 0 requeues the
job with the straggler's host added to its ``ExcNodeList`` (``dist/slurm.py``); every rank exits 75.

Put it after your logging callbacks: with ``action="exit"`` its ``on_train_end`` ends the process.
On CUDA the readings are CUDA events, read at the check; elsewhere host clock readings.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import statistics
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from ..dist import collectives
from ..dist.host import host_name
from ..dist.slurm import RequeueError, job_id, requeue_excluding
from ..dist.lagging import SLOW_BELOW, check_fraction
from .base import Callback
from .preemption import PREEMPTED_EXIT_CODE
from .straggler_rule import Straggler, describe, find_stragglers

if TYPE_CHECKING:
    from ..trainer import Trainer

logger = logging.getLogger(__name__)
ACTIONS = ("warn", "exit")
FIRST_CHECK = 10       # steps before the first time-based check, which learns the pace
MAX_INTERVAL = 10_000  # steps between time-based checks, at most


class StragglerCallback(Callback):
    """Finds stragglers during ``fit`` and warns, or checkpoints and exits 75 (see the module docstring)."""

    def __init__(self, every_n_steps: int | None = None, every_s: float = 60.0, threshold: float = SLOW_BELOW,
                 patience: int = 2, min_cost: float = 0.05, action: str = "warn") -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise ValueError(f"every_n_steps={every_n_steps!r} must be a positive number of optimizer steps or None")
        if isinstance(every_s, bool) or not isinstance(every_s, (int, float)) or not 0 < every_s < math.inf:
            raise ValueError(f"every_s={every_s!r} must be a positive number of seconds, e.g. 60")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience={patience!r} must be a positive number of checks, e.g. 2")
        if action not in ACTIONS:
            raise ValueError(f"action={action!r} is not one of {list(ACTIONS)}")
        self.every_n_steps, self.every_s, self.patience, self.action = every_n_steps, float(every_s), patience, action
        self.threshold = check_fraction("threshold", threshold)
        self.min_cost = check_fraction("min_cost", min_cost)
        self.checks: list[tuple[int, list[int]]] = []  # (step, the ranks that lagged) of every check
        self.found: list[tuple[int, str, Straggler]] = []  # (step, host, straggler) once lagging `patience` checks
        self.decision: dict[str, Any] | None = None  # what action="exit" acts on, once decided
        self._hook: Any = None

    # ---------------------------------------------------------------- per step
    def _forward_done(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._fwd = self._mark()

    def on_backward_end(self, batch_idx: int, trainer: "Trainer", logs: dict | None = None) -> None:
        if logs["ends_window"]:
            self._bwd = self._mark()

    def on_batch_end(self, batch_idx: int, trainer: "Trainer", logs: dict | None = None) -> None:
        if not logs["ends_window"]:
            return
        end = self._mark()
        self._steps.append((self._prev, self._fwd, self._bwd, end))
        self._prev = end
        if trainer.global_step >= self._next_check:
            self._check(trainer)
            self._prev = self._mark()  # the check is not part of the next step

    # ---------------------------------------------------------------- lifecycle
    def on_train_begin(self, trainer: "Trainer", logs: dict | None = None) -> None:
        if self.action == "exit" and trainer.config.checkpoint_dir is None:
            raise ValueError("StragglerCallback(action='exit') saves a checkpoint before it exits: pass "
                             "checkpoint_dir=... (and auto_resume=True) to the Trainer, or use action='warn'")
        self._cuda = trainer.device.type == "cuda"
        self._mark = _cuda_mark if self._cuda else time.perf_counter
        self._hosts = collectives.all_gather_object(host_name(os.environ))  # once per fit, for the verdicts
        self._streak = [0] * trainer.world_size
        self._interval = self.every_n_steps or FIRST_CHECK
        self._next_check = trainer.global_step + self._interval
        self._checked_at, self._checked_step = time.perf_counter(), trainer.global_step
        self._steps: list[tuple[Any, Any, Any, Any]] = []
        self._prev = self._fwd = self._bwd = self._mark()
        self.decision = None
        self._hook = trainer.module.register_forward_hook(self._forward_done)

    def on_epoch_begin(self, epoch: int, trainer: "Trainer", logs: dict | None = None) -> None:
        self._prev = self._mark()  # the epoch turnover is not a step

    def on_evaluate_end(self, trainer: "Trainer", logs: dict | None = None) -> None:
        self._prev = self._mark()  # nor is an evaluation

    def on_exception(self, exc: BaseException, trainer: "Trainer", logs: dict | None = None) -> None:
        self._remove_hook()

    def on_train_end(self, trainer: "Trainer", logs: dict | None = None) -> None:
        self._remove_hook()
        if self.decision is None:
            return
        if (logs or {}).get("completed"):
            logger.info("straggler check: training completed before the stop; nothing to do")
            return
        self._leave(trainer)

    # ---------------------------------------------------------------- the check
    def _check(self, trainer: "Trainer") -> None:
        """Collective, at the same step on every rank: reduce the figures, judge, act."""
        local, step = self._window()
        now = time.perf_counter()
        steps_done = max(1, trainer.global_step - self._checked_step)
        wish = self.every_s / ((now - self._checked_at) / steps_done) if now > self._checked_at else 1.0
        n, rank = trainer.world_size, trainer.rank
        figures = torch.zeros(3 * n, dtype=torch.float64, device=trainer.device)
        figures[rank], figures[n + rank], figures[2 * n + rank] = local, step, min(max(wish, 1.0), MAX_INTERVAL)
        reduced = collectives.all_reduce(figures).tolist()  # each rank wrote its own slots: a gather, in one call
        self._interval = self.every_n_steps or int(max(reduced[2 * n:]))
        self._next_check = trainer.global_step + self._interval
        self._checked_at, self._checked_step = time.perf_counter(), trainer.global_step
        lagging = find_stragglers(reduced[:n], reduced[n:2 * n], self.threshold, self.min_cost)
        ranks = {s.rank for s in lagging}
        self.checks.append((trainer.global_step, sorted(ranks)))
        self._streak = [count + 1 if r in ranks else 0 for r, count in enumerate(self._streak)]
        confirmed = [s for s in lagging if self._streak[s.rank] >= self.patience]
        for straggler in confirmed:
            self.found.append((trainer.global_step, self._hosts[straggler.rank], straggler))
            if trainer.is_main_process:  # the same verdict on every rank: one of them says it
                logger.warning("straggler at optimizer step %d: %s", trainer.global_step,
                               describe(straggler, self._hosts[straggler.rank]))
        if confirmed and self.action == "exit" and self.decision is None:
            self.decision = {"step": trainer.global_step, "ranks": [s.rank for s in confirmed],
                             "hosts": sorted({self._hosts[s.rank] for s in confirmed})}
            trainer.stop_training = True  # on every rank at this step: the agreement stops them together

    def _window(self) -> tuple[float, float]:
        """This rank's median local and step time (ms) over the steps since the last check; NaN without any."""
        steps, self._steps = self._steps, []
        if not steps:
            return math.nan, math.nan
        if self._cuda:
            torch.cuda.synchronize()
            ms = _event_ms
        else:
            ms = _host_ms
        local = [ms(prev, fwd) + ms(bwd, end) for prev, fwd, bwd, end in steps]
        return statistics.median(local), statistics.median(ms(prev, end) for prev, _, _, end in steps)

    # ---------------------------------------------------------------- the exit
    def _leave(self, trainer: "Trainer") -> None:
        """Every rank: save, then (rank 0, in a SLURM job) requeue without the hosts; exit 75."""
        hosts = self.decision["hosts"]
        path = trainer.save_in_dir(trainer.config.checkpoint_dir, reason="straggler", hosts=",".join(hosts))
        trainer.checkpoints.wait()
        if threading.current_thread() is threading.main_thread():
            # The requeue ends the job and Slurm TERMs every process; they are on their way out with 75.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        logger.info("straggler on %s: every rank stopped after optimizer step %d; saved %s",
                    ", ".join(hosts), trainer.global_step, path)
        if trainer.is_main_process:
            _requeue_without(hosts)
        collectives.barrier()  # no rank exits (which may end the job step) before the requeue is asked
        raise SystemExit(PREEMPTED_EXIT_CODE)

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _requeue_without(hosts: list[str]) -> None:
    job = job_id(os.environ)
    if job is None:
        logger.warning("not a SLURM job: start the job again without %s; it resumes from the checkpoint",
                       ", ".join(hosts))
        return
    try:
        excluded = requeue_excluding(job, hosts)
    except RequeueError as exc:
        logger.error("%s", exc)
        return
    logger.warning("requeued SLURM job %s without %s (ExcNodeList=%s): its next run resumes from the checkpoint",
                   job, ", ".join(hosts), excluded)


def _cuda_mark() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _event_ms(a: torch.cuda.Event, b: torch.cuda.Event) -> float:
    return a.elapsed_time(b)


def _host_ms(a: float, b: float) -> float:
    return (b - a) * 1e3
