"""The watchdog: when no micro-batch starts or ends for ``watchdog_timeout`` seconds, every rank
dumps its threads' stacks and the job ends naming the rank(s) that did not reach the collective.

Healthy cost: two hook calls per micro-batch that store ``time.monotonic()`` and bump a counter (no
collective, no lock). A daemon thread per rank wakes every few seconds and compares. When the
heartbeat is stale it (1) writes every thread's stack (``faulthandler``) to
``<checkpoint_dir or cwd>/watchdog-rank{r}.txt`` and to stderr; (2) posts this rank's counter to the
group's store (the store, not the process group: the main thread may be inside a collective on it);
the first rank to post waits a little for the others, reads every counter in one go and publishes
the verdict, the lowest or missing counters being the ranks that are behind, which the other ranks
read (a few store operations per rank, ``dist/arrival.py``); (3) logs one line naming them, records it as torchrun's error for this rank, and ends the process with
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
        message = (f"watchdog: no micro-batch started or ended for {stale:.0f} s (watchdog_timeout={self.timeout:g}); "
                   f"{who} (hook calls per rank: {counts}); "
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

    def _behind(self) -> tuple[list[int], str]:
        """The ranks with the lowest hook count, or none posted (a rank that cannot run Python), and the
        counts in words; judged by the first rank to fire, read by the others."""
        if self.store is None or self.world_size == 1:
            return [self.rank], f"rank {self.rank} at {self.count}"
        point = arrival.Arrivals(self.store, "anndist/watchdog", self.world_size)
        point.arrive(self.rank, str(self.count))
        verdict = point.verdict(lambda: judge(point.arrived(), self.world_size), min(self.timeout, 10.0))
        if verdict is None:
            return [], "unknown (the rank judging them did not answer)"
        behind, _, counts = verdict.partition(";")
        return [int(r) for r in behind.split(",") if r], counts


def judge(counts: dict[int, str], world_size: int) -> str:
    """``"<behind ranks>;<counts in words>"`` from every posted hook count: the ranks with the lowest count
    (when counts differ) and those that posted none are behind. The words group ranks by count, so the
    line stays short at any number of ranks."""
    missing = [r for r in range(world_size) if r not in counts]
    values = {r: int(c) for r, c in counts.items()}
    lowest = min(values.values()) if values else None
    behind = missing + ([r for r, c in values.items() if c == lowest] if len(set(values.values())) > 1 else [])
    by_count: dict[int, list[int]] = {}
    for r, c in sorted(values.items()):
        by_count.setdefault(c, []).append(r)
    words = [f"{_ranks(ranks)} at {c}" for c, ranks in sorted(by_count.items())]
    words += [f"{_ranks(missing)} unknown"] if missing else []
    return ",".join(map(str, sorted(behind))) + ";" + ", ".join(words)


def _ranks(ranks: list[int]) -> str:
    """``rank 3``, ``ranks 0-2``, ``ranks 0-2, 5`` (runs of consecutive ranks as ranges)."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    text = ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)
    return f"rank {text}" if len(ranks) == 1 else f"ranks {text}"


def _record_for_torchrun(message: str) -> None:
    """Write ``message`` as this worker's error file, which torchrun prints as the failure's cause."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
        ErrorHandler().record_exception(RuntimeError(message))
    except Exception:  # noqa: BLE001 (the exit that follows matters more than the record)
        pass
