"""The watchdog: when no micro-batch starts or ends for ``watchdog_timeout`` seconds, every rank
dumps its threads' stacks and the job ends naming the rank(s) that did not reach the collective.

Healthy cost: two hook calls per micro-batch that store ``time.monotonic()`` and bump a counter (no
collective, no lock). A daemon thread per rank wakes every few seconds and compares. When the
heartbeat is stale it (1) writes every thread's stack (``faulthandler``) to
``<checkpoint_dir or cwd>/watchdog-rank{r}.txt`` and to stderr; (2) posts this rank's counter to the
group's store and reads the others' (the store, not the process group: the main thread may be
inside a collective on it), the lowest or missing counters being the ranks that are behind; (3)
logs one line naming them, records it as torchrun's error for this rank, and ends the process with
``os._exit``. Why ``os._exit``: the main thread is blocked in a collective or in user code, where an
exception raised into it (``_thread.interrupt_main``) is not seen until it returns, which it may
never do; exiting lets torchrun stop the job at once. The ranks that are behind exit first and the
others a moment later, so torchrun's "first observed failure" is a rank that was stuck.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..dist import arrival, collectives
from .base import Callback

logger = logging.getLogger(__name__)
EXIT_CODE = 70  # EX_SOFTWARE: a rank that the watchdog ended
AHEAD_GRACE = 3.0  # seconds the ranks that are not behind wait, so that a stuck rank exits first


class Watchdog(Callback):
    """Ends a run whose ranks made no progress for ``timeout`` seconds; see the module docstring."""

    def __init__(self, timeout: float, folder: str | os.PathLike | None = None) -> None:
        self.timeout, self.folder = float(timeout), folder
        self.beat, self.count = time.monotonic(), 0
        self._stop: threading.Event | None = None

    def on_batch_begin(self, batch_idx: int, trainer: Any, logs: dict | None = None) -> None:
        self.beat, self.count = time.monotonic(), self.count + 1

    on_batch_end = on_evaluate_begin = on_evaluate_end = on_batch_begin  # type: ignore[assignment]

    def on_train_begin(self, trainer: Any, logs: dict | None = None) -> None:
        self.beat, self.rank, self.world_size = time.monotonic(), collectives.rank(), collectives.world_size()
        self.store = arrival.default_store()
        self.path = Path(self.folder or os.getcwd()) / f"watchdog-rank{self.rank}.txt"
        self._stop = threading.Event()
        threading.Thread(target=self._watch, args=(self._stop,), name="anndist-watchdog", daemon=True).start()

    def on_train_end(self, trainer: Any, logs: dict | None = None) -> None:
        if self._stop is not None:
            self._stop.set()

    def on_exception(self, exc: BaseException, trainer: Any, logs: dict | None = None) -> None:
        self.on_train_end(trainer)

    def _watch(self, stop: threading.Event) -> None:
        period = min(max(self.timeout / 4, 0.1), 5.0)
        while not stop.wait(period):
            stale = time.monotonic() - self.beat
            if stale > self.timeout:
                self._fire(stale)

    def _fire(self, stale: float) -> None:
        self._dump(stale)
        behind, counts = self._behind()
        who = (f"rank(s) {behind} did not reach the collective" if behind else
               "no rank is behind another: they hang together (a collective, I/O, a deadlock)")
        where = ", ".join(f"rank {r} at {counts.get(r, 'unknown')}" for r in range(self.world_size))
        message = (f"watchdog: no micro-batch started or ended for {stale:.0f} s (watchdog_timeout={self.timeout:g}); "
                   f"{who} (hook calls per rank: {where}); "
                   f"stacks in {self.path.parent}/watchdog-rank*.txt")
        if self.rank == 0:
            logger.error(message)
        else:  # the other ranks' loggers are quiet by configuration; this line must still be seen
            print(f"[rank {self.rank}] {message}", file=sys.stderr, flush=True)
        _record_for_torchrun(message)
        if self.rank not in behind and behind:
            time.sleep(AHEAD_GRACE)  # a stuck rank exits first and is torchrun's root cause
        os._exit(EXIT_CODE)

    def _dump(self, stale: float) -> None:
        header = f"anndist watchdog, rank {self.rank}: no progress for {stale:.0f} s; all threads:\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as file:
                file.write(header)
                file.flush()
                faulthandler.dump_traceback(file, all_threads=True)
        except OSError as exc:
            print(f"[rank {self.rank}] watchdog: cannot write {self.path}: {exc}", file=sys.stderr, flush=True)
        sys.stderr.write(f"[rank {self.rank}] {header}")
        sys.stderr.flush()
        faulthandler.dump_traceback(sys.stderr, all_threads=True)

    def _behind(self) -> tuple[list[int], dict[int, int]]:
        """The ranks with the lowest hook count, or none posted (a rank that cannot run Python)."""
        if self.store is None or self.world_size == 1:
            return [self.rank], {self.rank: self.count}
        prefix = "anndist/watchdog"
        arrival.post(self.store, prefix, self.rank, str(self.count))
        missing = arrival.missing_ranks(self.store, prefix, self.world_size, min(self.timeout, 10.0))
        counts = {r: int(arrival.read(self.store, prefix, r)) for r in range(self.world_size) if r not in missing}
        lowest = min(counts.values())
        return sorted(missing + [r for r, c in counts.items() if c == lowest and len(set(counts.values())) > 1]), counts


def _record_for_torchrun(message: str) -> None:
    """Write ``message`` as this worker's error file, which torchrun prints as the failure's cause."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
        ErrorHandler().record_exception(RuntimeError(message))
    except Exception:  # noqa: BLE001 (the exit that follows matters more than the record)
        pass
