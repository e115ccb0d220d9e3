"""DataLoader workers that outlive a SIGTERM meant for their rank.

Slurm (proctrack/cgroup) sends its time-limit, ``scancel`` and preemption TERM to every process of
the job step, DataLoader workers included. torch's worker handler dies of a TERM that does not come
from its parent, the rank then fails with "DataLoader worker ... is killed by signal: Terminated"
and its preemption save never happens. Ignoring TERM in the workers is not enough either: torch
(and multiprocessing at interpreter exit) stops workers with a TERM from the parent, and a worker
that ignores it hangs the rank's exit.

So while ``shield_workers(True)`` is in force (the PreemptionCallback turns it on for ``fit``), a
process forked from this one (a DataLoader worker: ``fork`` is the default start method on Linux)
blocks SIGTERM and hands it to a thread that waits for it with ``sigwaitinfo``: a TERM from the
parent ends the worker (``os._exit(0)``, as torch's own handler does), any other is dropped. The
rank's handler then stops every rank at the same step and saves. A worker whose rank is gone still
ends on its own (torch's workers watch their parent).

Costs nothing per batch: one thread per worker, asleep in ``sigwaitinfo``. Not covered: workers
started with ``spawn`` or ``forkserver`` (not forked from the rank), and platforms without
``sigwaitinfo`` (macOS). Programs a worker starts with ``exec`` inherit the blocked TERM.
"""
from __future__ import annotations

import os
import signal
import threading

_armed = False
_registered = False


def available() -> bool:
    return hasattr(os, "register_at_fork") and hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask")


def shield_workers(on: bool) -> None:
    """While on, processes forked from this one ignore a SIGTERM unless their parent sends it."""
    global _armed, _registered
    if on and not _registered and available():
        os.register_at_fork(after_in_child=_in_child)
        _registered = True
    _armed = on and _registered


def _in_child() -> None:
    global _armed
    if not _armed:
        return
    _armed = False  # the worker's own children, if any, are not the rank's workers
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
    threading.Thread(target=_take_term, args=(parent,), name="anndist-worker-term", daemon=True).start()


def _take_term(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:  # the rank stopping its worker (torch, or multiprocessing at exit)
            os._exit(0)
