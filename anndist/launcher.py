"""``python -m anndist.launcher [torchrun options] script [args]``: torchrun that ends a preemption quietly.

After a preemption every anndist rank saves and exits 75 (:data:`PREEMPTED_EXIT_CODE`, "try
again"). torchrun reads that as a crash: an error line per node, a ``ChildFailedError`` traceback
and exit 1. And when Slurm ends the job step (the requeue that rank 0 asked for, or srun's
``--kill-on-bad-exit`` once another node exited 75), the SIGTERM makes torchrun shut its workers
down with a "Received 15 death signal" warning and a ``SignalException`` traceback, although they
were only finishing. A preempted job's log then reads like a crash although the run will resume.

This module is torchrun (``torch.distributed.run``, same options) with two changes:

1. When every failed worker exited 75, it prints one line and exits 75 instead of the error line
   and traceback.
2. It takes SIGTERM from torchrun: the signal is passed on to the workers and the agent keeps
   waiting for them, so their own exit status decides (75 after anndist saved). A TERM before
   any worker runs (during the rendezvous), or one :data:`REPEAT_AFTER_S` seconds after the
   first, is torchrun's again: the workers are shut down and the traceback says so.

Anything else, a worker that exits 1 or dies of a signal, torchrun reports as before, with the
traceback and its root cause. ``slurm/single_node.sbatch`` and ``slurm/multi_node.sbatch`` start
their ranks with it.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from types import FrameType

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing import api as torch_processes
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

from .callbacks.preemption import PREEMPTED_EXIT_CODE, REPEAT_AFTER_S

# The two records torchrun's process context logs on the way to a ChildFailedError (torch 2.13):
# the first failed worker, and each worker still running when the others failed.
_FAILED = "failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s"
_CLOSING = "Sending process %s closing signal %s"


@record
def main(argv: list[str] | None = None) -> None:
    """Run torchrun with ``argv`` (default: ``sys.argv[1:]``); exit 75 quietly after a preemption."""
    args = torchrun.parse_args(argv)
    args.signals_to_handle = _without_sigterm(args.signals_to_handle)
    watch = PreemptionWatch()
    previous = signal.signal(signal.SIGTERM, watch.on_sigterm)
    torch_processes.logger.addFilter(watch)
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        if not preempted(exc):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # Slurm may still be ending the step: done
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        print(f"anndist: node {node}: workers preempted (exit {PREEMPTED_EXIT_CODE}), torchrun exits "
              f"{PREEMPTED_EXIT_CODE}", file=sys.stderr, flush=True)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    finally:
        if not watch.preempted:
            watch.release()
        torch_processes.logger.removeFilter(watch)
        if signal.getsignal(signal.SIGTERM) == watch.on_sigterm:
            signal.signal(signal.SIGTERM, previous)


def preempted(exc: ChildFailedError) -> bool:
    """True when every failed worker exited 75: anndist's ranks after a preemption, checkpoint saved."""
    return bool(exc.failures) and all(f.exitcode == PREEMPTED_EXIT_CODE for f in exc.failures.values())


class PreemptionWatch(logging.Filter):
    """Hides torchrun's records of workers that exited 75, and handles the agent's SIGTERM.

    A logging filter because torchrun logs the failed worker before it raises (no hook runs in between).
    When one worker fails, torchrun first TERMs the workers still running ("Sending process ...
    closing signal"), then logs the failure: those records are held until the failure says whether it
    is a preemption (dropped) or not (logged as usual, in order; :meth:`release` logs any still held).
    The TERM handler needs the same knowledge: a TERM after preempted workers are gone belongs to the
    preemption (Slurm ending the step) and is ignored.
    """

    def __init__(self) -> None:
        super().__init__()
        self.preempted = False  # a worker of this agent exited 75
        self._held: list[logging.LogRecord] = []
        self._first_term: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "anndist_released", False):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        if record.msg == _CLOSING:
            if not self.preempted:
                self._held.append(record)
            return False
        if record.msg == _FAILED and args:
            if args[0] == PREEMPTED_EXIT_CODE:
                self.preempted, self._held = True, []
                return False
            self.release()
        return True

    def release(self) -> None:
        """Log the records held so far (torchrun's report of a failure that is not a preemption)."""
        held, self._held = self._held, []
        for entry in held:
            entry.anndist_released = True
            torch_processes.logger.handle(entry)

    def on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """Pass TERM on to the workers and keep waiting for them; see the module docstring."""
        workers = children(os.getpid())
        now = time.monotonic()
        if self._first_term is None and workers:
            self._first_term = now
        if workers and now - self._first_term < REPEAT_AFTER_S:
            for pid in workers:
                _signal(pid, signum)
            return
        if not workers and self.preempted:
            return  # the workers exited 75 and the agent is finishing
        # torchrun's own handler: the agent shuts the workers down and re-raises (traceback, exit 1).
        sigval = signal.Signals(signum)
        raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux ``/proc``; empty elsewhere): torchrun's workers."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            found.append(int(name))
    return found


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # exited meanwhile


def _without_sigterm(names: str) -> str:
    """torchrun's ``--signals-to-handle`` minus SIGTERM, which :class:`PreemptionWatch` handles."""
    kept = [name.strip() for name in names.split(",") if name.strip() and name.strip() != "SIGTERM"]
    return ",".join(kept) or "SIGINT"


if __name__ == "__main__":
    main()
