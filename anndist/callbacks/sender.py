"""A tracker's calls, off the training thread: in order, through a bounded queue, never fatal.

An experiment tracker is a network service: unreachable, it retries for minutes (MLflow's client
backs off up to 7 times per call, W&B waits 90 s for ``init``), and a server answering 503 does the
same on every call. Called from the training loop, that stalled every rank (the others wait in the
next collective) and then ended the run. So rank 0's tracker calls run on a daemon thread of their
own, one at a time in the order given:

* the training thread only appends to a queue (at most ``limit`` calls waiting; past that, calls
  are dropped and counted, so a tracker that cannot keep up costs memory, never time);
* a failing call is logged once (the first), the next calls still run (a service that comes back
  gets the later records), and the run goes on;
* ``wait(timeout)`` (the end of ``fit``) blocks at most ``timeout`` seconds; what is still queued
  then is left to the thread, which dies with the process.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

logger = logging.getLogger(__name__)


class Sender:
    def __init__(self, owner: str, limit: int) -> None:
        self.owner, self.limit = owner, limit
        self.failures = self.dropped = 0
        self._calls: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; it runs after every call queued before it (dropped when the queue is full)."""
        with self._cond:
            if len(self._calls) >= self.limit:
                self.dropped += 1
                if self.dropped == 1:
                    logger.warning("%s: the tracker is %d calls behind; dropping records until it catches up "
                                   "(training goes on)", self.owner, self.limit)
                return
            self._calls.append((fn, args))
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"anndist-{self.owner}", daemon=True)
                self._thread.start()

    def wait(self, timeout: float) -> bool:
        """Block until every queued call ran, at most ``timeout`` seconds; True when they all did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._calls or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def pending(self) -> int:
        with self._cond:
            return len(self._calls) + self._busy

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._calls:
                    self._cond.wait()
                fn, args = self._calls.popleft()
                self._busy = True
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 (a tracker must never end the run)
                self.failures += 1
                if self.failures == 1:
                    logger.warning("%s failed (%s: %s); training goes on, and this is the only warning about it",
                                   self.owner, type(exc).__name__, " ".join(str(exc).split())[:300])
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
