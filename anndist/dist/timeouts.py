"""A collective that timed out, explained: which ranks never arrived.

Without the watchdog (off by default), a rank stuck outside any collective (in user code, data
loading, I/O) makes its peers' next collective fail after ``dist_timeout`` with an error that names
no rank, and the launcher then reports the rank that waited as the job's root cause. So when a
collective times out, each rank that saw it posts its arrival at the failure to the group's store
(not the process group, which may be broken) and waits a little for the others'; the ranks that
never post are the ones that never reached a collective. Nothing of this runs while training is
healthy: it is the failure path only.
"""
from __future__ import annotations

import re
from datetime import timedelta

from . import arrival, collectives

GRACE_S = 10.0  # at most this long (and no longer than dist_timeout) for the other ranks' own timeouts
_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_failures = 0  # failures this process explained: a fresh prefix each (a store outlives a Trainer)


def is_collective_timeout(exc: BaseException) -> bool:
    """A RuntimeError (gloo, NCCL, a store) whose message says it timed out; a callback's wraps it."""
    return isinstance(exc, RuntimeError) and bool(_TIMEOUT.search(str(exc)))


def never_arrived(exc: BaseException, timeout: timedelta) -> RuntimeError | None:
    """An error naming the ranks that never reached a collective, when ``exc`` is a collective's timeout
    on several ranks (None otherwise; then ``exc`` stands as it is)."""
    global _failures
    store, world = arrival.default_store(), collectives.world_size()
    if store is None or world == 1 or not is_collective_timeout(exc):
        return None
    _failures += 1
    prefix, rank = f"anndist/timed_out{_failures}", collectives.rank()
    try:
        arrival.post(store, prefix, rank)
        missing = arrival.missing_ranks(store, prefix, world, min(GRACE_S, timeout.total_seconds()))
    except Exception:  # the store is gone too (its host died): nothing more to learn
        return None
    if not missing:
        return None  # every rank reached it: they hang together (a deadlock, a slow network), say nothing new
    arrived = [r for r in range(world) if r not in missing]
    return RuntimeError(
        f"a collective timed out after dist_timeout={timeout.total_seconds():g} s: rank(s) {missing} never arrived "
        f"(stuck outside any collective: in user code, data loading or I/O, or dead), while rank(s) {arrived} waited "
        "in it. Look at what those ranks were doing; watchdog_timeout=... dumps every rank's stacks when it happens")
