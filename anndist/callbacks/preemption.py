"""PreemptionCallback: on SIGUSR1 or SIGTERM, stop all ranks at the same step, save, requeue, exit.

The Trainer installs one in every rank by default (``handle_signals=False`` turns it off). The
signal handler only sets ``trainer.stop_training``; the Trainer's stop agreement (the small async
all-reduce it runs anyway, about every ``stop_check_period`` seconds) makes every rank stop after
the same step, whichever ranks got the signal. Then, in ``on_train_end``, on every rank:

1. the checkpoint: ``save_in_dir(trainer, checkpoint_dir)`` (rank 0 writes atomically);
2. for a requeue signal (SIGUSR1 by default: the warning Slurm sends before a time limit, see
   ``docs/slurm.md``) inside a SLURM job, rank 0 runs ``scontrol requeue $SLURM_JOB_ID``; the rerun
   resumes from the checkpoint when the Trainer has ``auto_resume=True``;
3. exit with :data:`PREEMPTED_EXIT_CODE` (75, sysexits' EX_TEMPFAIL: "try again"), so no code after
   ``fit()`` runs as if training had finished. Without a ``checkpoint_dir`` nothing is saved or
   requeued and the exit status is 128 + the signal number, as if the signal had killed the process.

SIGTERM does not requeue by default: it is also what ``scancel`` sends, and a cancelled job must
stay cancelled. Handlers are installed for the duration of ``fit()`` only, from the main thread, and
handed back in ``on_train_end`` or, when ``fit()`` raised, in ``on_exception``.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
import weakref
from types import FrameType
from typing import TYPE_CHECKING, Iterable

import torch
import torch.distributed as dist

from ..data.worker_signals import shield_workers
from ..dist import collectives
from ..dist.slurm import RequeueError, job_id, requeue
from .base import Callback

if TYPE_CHECKING:
    from ..trainer import Trainer

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75
REPEAT_AFTER_S = 5.0  # a SIGTERM this long after the first takes the default action
_DEFAULT_SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None), signal.SIGTERM) if s is not None)
_DEFAULT_REQUEUE = tuple(s for s in (getattr(signal, "SIGUSR1", None),) if s is not None)


class PreemptionCallback(Callback):
    """Turns ``signals`` into a clean stop, a checkpoint, a requeue (``requeue_signals``) and an exit."""

    def __init__(self, signals: Iterable[int] = _DEFAULT_SIGNALS, requeue_signals: Iterable[int] = _DEFAULT_REQUEUE,
                 exit: bool = True) -> None:
        self.signals = _check_signals("signals", signals)
        self.requeue_signals = _check_signals("requeue_signals", requeue_signals)
        if not set(self.requeue_signals) <= set(self.signals):
            raise ValueError(f"requeue_signals={_names(self.requeue_signals)} must be among signals={_names(self.signals)}")
        self.exit = exit
        self.received: set[int] = set()  # signals this rank got during the current fit()
        self._previous: dict[int, object] = {}
        self._stopping = False  # on_train_end reached: the rank is stopping, saving, exiting
        self._handler: object = None

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, trainer: "Trainer", logs: dict | None = None) -> None:
        self.received = set()
        self._first_at: dict[int, float] = {}
        self._stopping = False
        self._install(trainer)

    def on_train_end(self, trainer: "Trainer", logs: dict | None = None) -> None:
        self._stopping = True  # from here on a repeated TERM is a late copy of the first, never a reason to die
        signals: list[int] = []
        try:
            signals = self._agreed_signals(trainer, completed=bool((logs or {}).get("completed")))
        finally:
            if signals:  # ignored before the handlers go: no instant in which a copy of the TERM kills the save
                self._exit_on_sigterm()
            self._uninstall()
        if signals:
            self._stop(trainer, signals)

    def on_exception(self, exc: BaseException, trainer: "Trainer", logs: dict | None = None) -> None:
        self._uninstall()  # the signals keep their default action again: a second one ends the process

    # ------------------------------------------------------------------ signal handlers
    def _install(self, trainer: "Trainer") -> None:
        self._uninstall()  # still installed if the previous fit() ended by an exception
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "PreemptionCallback: fit() runs outside the main thread, where Python cannot install signal "
                "handlers; SIGUSR1/SIGTERM keep their default action (pass handle_signals=False to silence this)")
            return
        trainer_ref = weakref.ref(trainer)

        def handler(signum: int, frame: FrameType | None) -> None:
            now = time.monotonic()
            first = self._first_at.setdefault(signum, now)
            if signum == signal.SIGTERM and now - first >= REPEAT_AFTER_S and not self._stopping:
                # A second TERM well after the first, before the rank even began to stop (a hung
                # rank, an impatient user): the default action. Launchers often deliver one TERM
                # several times (Slurm to every process, the batch shell and torchrun to the
                # workers), seconds apart on a loaded machine: those repeats only set the flag
                # again, and once the rank is stopping (saving) they are ignored; Slurm's SIGKILL,
                # KillWait seconds after its TERM, remains the limit.
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            # Only flags here (a handler may interrupt anything); the agreement does the rest.
            self.received.add(signum)
            current = trainer_ref()
            if current is not None:
                current.stop_training = True

        self._handler = handler
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, handler)
        # The TERM reaches the DataLoader workers too (proctrack/cgroup): they must outlive it.
        shield_workers(signal.SIGTERM in self.signals)

    def _uninstall(self) -> None:
        for sig, previous in self._previous.items():
            # Hand back only what is still ours: a TERM ignored for a stop that is saving (``_exit_on_sigterm``,
            # or another callback on its way out) stays ignored.
            if signal.getsignal(sig) is self._handler:
                signal.signal(sig, previous)
        self._previous.clear()
        shield_workers(False)

    # ------------------------------------------------------------------ stopping
    def _agreed_signals(self, trainer: "Trainer", completed: bool) -> list[int]:
        """Signals any rank received during fit, unless training completed (same answer on every rank).

        The reduction runs on every rank whatever its own flags say: a signal can reach one rank after
        the last stop agreement, so ``stop_training`` may differ between ranks here; the reduced
        signals and ``completed`` (from the agreed position) do not.
        """
        got = torch.tensor([s in self.received for s in self.signals], dtype=torch.int32, device=trainer.device)
        collectives.all_reduce(got, op=dist.ReduceOp.MAX)  # once per fit(), not per step
        signals = [s for s, flag in zip(self.signals, got.tolist()) if flag]
        if signals and completed:
            logger.info("%s arrived after the last optimizer step: training is complete", _names(signals))
            return []
        return signals

    def _stop(self, trainer: "Trainer", signals: list[int]) -> None:
        names = _names(signals)
        logger.info("%s received: every rank stopped after optimizer step %d (epoch %d)",
                    names, trainer.global_step, trainer.epoch)
        checkpoint_dir = trainer.config.checkpoint_dir
        if checkpoint_dir is None:
            logger.info("no checkpoint_dir: nothing saved and the job is not requeued; pass checkpoint_dir=... "
                        "and auto_resume=True to the Trainer to continue after a preemption")
            collectives.barrier()
            self._exit(trainer, 128 + signals[0])
            return
        path = trainer.save_in_dir(checkpoint_dir, reason="preempted", signal=names)
        trainer.checkpoints.wait()  # an asynchronous save: committed before the requeue and the exit
        logger.info("saved %s", path)
        if set(signals) & set(self.requeue_signals) and trainer.is_main_process:
            self._requeue()
        collectives.barrier()  # no rank exits (which may end the job step) before the requeue is asked
        self._exit(trainer, PREEMPTED_EXIT_CODE)

    @staticmethod
    def _requeue() -> None:
        job = job_id(os.environ)
        if job is None:
            logger.info("not a SLURM job: nothing to requeue; run again to resume from the checkpoint")
            return
        try:
            requeue(job)
        except RequeueError as exc:
            logger.error("%s", exc)
            return
        logger.warning("requeued SLURM job %s: its next run resumes from the checkpoint", job)

    def _exit_on_sigterm(self) -> None:
        # From the agreed stop on, a TERM must not kill the rank: copies of the one that started the stop
        # (Slurm's, the batch shell's, the launcher's: seconds apart on a loaded machine) may come while it
        # saves, and the first rank to exit makes torchrun TERM the others on their way out. Ignoring it
        # lets every rank save and exit 75; Slurm's SIGKILL (KillWait) still ends a save that hangs.
        # SIG_IGN, not a Python handler: Python resets its own handlers to the default while it shuts down.
        if self.exit and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def _exit(self, trainer: "Trainer", code: int) -> None:
        if self.exit:
            trainer.callbacks.end_run()  # the closing line stays the log's last, after the save and the requeue
            raise SystemExit(code)


def _check_signals(name: str, signals: Iterable[int]) -> tuple[int, ...]:
    try:
        result = tuple(signal.Signals(s) for s in signals)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={signals!r} must be signal numbers such as signal.SIGUSR1") from None
    return result


def _names(signals: Iterable[int]) -> str:
    return "/".join(signal.Signals(s).name for s in signals)
