"""``python -m anndist.launcher``'s decisions, on constructed failures and log records: a preemption only
when every failed worker exited 75, torchrun's report of it dropped and of a crash kept, SIGTERM taken
from torchrun. The real launches: tests/e2e/test_launcher.py."""
from __future__ import annotations

import logging

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from anndist import launcher


def _failure(rank: int, exitcode: int) -> ProcessFailure:
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="<N/A>")


@pytest.mark.parametrize("codes, expected", [((75, 75), True), ((75,), True), ((75, 1), False),
                                             ((75, -15), False), ((1,), False)])
def test_preempted_only_when_every_failed_worker_exited_75(codes, expected):
    exc = ChildFailedError("train.py", {rank: _failure(rank, code) for rank, code in enumerate(codes)})
    assert launcher.preempted(exc) is expected


def _record(msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord("torch.distributed.elastic.multiprocessing.api", logging.WARNING, __file__, 1,
                             msg, args, None)


def test_torchruns_report_of_a_preemption_is_dropped_and_of_a_crash_kept_in_order(monkeypatch):
    """torchrun TERMs the remaining workers before it logs the failure: held until the failure decides."""
    released = []
    monkeypatch.setattr(launcher.torch_processes.logger, "handle", released.append)
    watch = launcher.PreemptionWatch()
    closing = _record(launcher._CLOSING, 11, "SIGTERM")
    assert not watch.filter(closing) and not released
    assert not watch.filter(_record(launcher._FAILED, 75, 0, 10, "python"))
    assert watch.preempted and not watch.filter(_record(launcher._CLOSING, 12, "SIGTERM"))
    watch.release()
    assert released == []  # a preemption: nothing of it is logged

    crash = launcher.PreemptionWatch()
    assert not crash.filter(closing)
    assert crash.filter(_record(launcher._FAILED, 1, 0, 10, "python"))  # logged, after the held record
    assert released == [closing] and not crash.preempted
    assert crash.filter(_record("anything else"))


def test_sigterm_is_taken_from_torchrun_and_the_rest_kept():
    assert launcher._without_sigterm("SIGTERM,SIGINT,SIGHUP,SIGQUIT") == "SIGINT,SIGHUP,SIGQUIT"
    assert launcher._without_sigterm("SIGUSR1, SIGTERM") == "SIGUSR1"
    assert launcher._without_sigterm("SIGTERM") == "SIGINT"
