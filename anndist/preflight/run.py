"""One pre-flight check on every rank: facts, measurements, a gather to rank 0, rank 0's verdict and table.

Every step is collective and runs in the same order on every rank: compute first (before any other
traffic), the links and the all-reduce, the checkpoint folder, then one gather of everything to rank
0 (a gather: only rank 0 needs the figures) and one broadcast of the verdict, so that every rank
ends the same way (all exit 1 under ``--strict``, or all raise under ``Trainer(preflight="strict")``).
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..dist import collectives
from ..dist.lagging import SLOW_BELOW
from .facts import rank_facts
from .folder_probe import probe_folder
from .measure import all_reduce_speed, compute_speed, link_speeds, node_leaders
from .table import format_report, summary
from .verdict import Problem, judge

ROUNDS, ROUND_S = 8, 0.08  # about 0.7 s; more rounds outlast neighbours that come and go


@dataclass
class PreflightResult:
    """``passed`` and ``summary`` on every rank; ``report`` (the table), ``problems`` and ``records`` on rank 0."""

    passed: bool
    summary: str
    elapsed: float
    report: str = ""
    problems: list[Problem] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)


def run_preflight(device: torch.device, entry: str | os.PathLike | None = None,
                  checkpoint_dir: str | os.PathLike | None = None, checkpoint_bytes: int | None = None,
                  threshold: float = SLOW_BELOW, rounds: int = ROUNDS, round_s: float = ROUND_S,
                  environ: Mapping[str, str] | None = None) -> PreflightResult:
    """Check the job this process belongs to (call it on every rank, in the process group if there is one).

    ``entry``: the script whose SHA-256 must agree; ``checkpoint_bytes``: the room a checkpoint needs
    (None: free space is shown, not judged); ``threshold``: a rank slower than this times the median
    of the others lags.
    """
    started = time.perf_counter()
    environ = os.environ if environ is None else environ
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    token = collectives.broadcast_object(uuid.uuid4().hex[:12])
    facts = rank_facts(environ, collectives.rank(), collectives.world_size(), device, entry)
    figures = compute_speed(device, rounds, round_s)
    all_facts = collectives.gather_object(facts)
    peers = collectives.broadcast_object(node_leaders([f["host"] for f in all_facts]) if all_facts else None)
    nbytes = (64 if device.type == "cuda" else 4) << 20
    links = link_speeds(peers, device, nbytes)
    all_reduce = all_reduce_speed(device, nbytes)
    probe = probe_folder(folder, token)
    gathered = collectives.gather_object({"compute": figures, "folder": probe})
    result = PreflightResult(True, "", 0.0)
    if gathered is not None:
        result.records = [{**f, **g} for f, g in zip(all_facts, gathered)]
        result.problems = judge(result.records, links, threshold, checkpoint_bytes)
        result.elapsed = time.perf_counter() - started
        result.summary = summary(result.records, result.problems, result.elapsed)
        result.report = format_report(result.records, links, all_reduce, result.problems, result.elapsed)
    verdict = collectives.broadcast_object((not result.problems, result.summary, result.elapsed))
    result.passed, result.summary, result.elapsed = verdict
    return result
