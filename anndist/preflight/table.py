"""The pre-flight table rank 0 prints: a line about the job, a row per rank, the all-reduce, the problems.

Columns: rank, host, local rank / local world size, device, threads / cores the rank may run on,
compute (median GFLOP/s over the rounds), x others (that speed against the median of the other
ranks, per round, median over rounds), cpu % (the share of the wall time the rank had a CPU while
computing), link (rank 0's round trip / 2 and bandwidth to this rank, on each node's first rank),
write (the checkpoint folder's probe write, fsync included), free (space left there), status.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

from .measure import describe_all_reduce
from .verdict import Problem, compute_ratios

# (title, width, right-aligned) of each column; the rows use the same widths.
COLUMNS = (("rank", 4, True), ("host", 16, False), ("local", 5, True), ("device", 8, False), ("thr/cores", 9, True),
           ("GFLOP/s", 8, True), ("x others", 8, True), ("cpu %", 5, True), ("link us", 8, True),
           ("link MB/s", 9, True), ("write MB/s", 10, True), ("free GiB", 8, True), ("status", 0, False))


def _line(cells: Sequence[str]) -> str:
    return " ".join(cell[:width].rjust(width) if right else cell[:width or None].ljust(width)
                    for cell, (_, width, right) in zip(cells, COLUMNS)).rstrip()


HEADER = _line([title for title, _, _ in COLUMNS])


def format_report(records: Sequence[dict[str, Any]], links: dict[int, dict[str, float]], all_reduce: Any,
                  problems: Sequence[Problem], elapsed: float) -> str:
    first = records[0]
    hosts = list(dict.fromkeys(r["host"] for r in records))
    entry = f"; entry {first['entry']} sha256 {first['entry_sha256']}" if first["entry"] else ""
    lines = [f"anndist preflight: {len(records)} rank(s) on {len(hosts)} host(s) ({first['launcher']}); python "
             f"{first['python']}, torch {first['torch']}, anndist {first['anndist']}{entry}", HEADER]
    ratios = compute_ratios(records)
    for record, ratio in zip(records, ratios):
        lines.append(_row(record, ratio, links.get(record["rank"]), problems))
    lines.append(describe_all_reduce(all_reduce))
    for problem in problems:
        lines.append(f"{problem.kind.upper()} {problem.where(records)}: {problem.text}")
    lines.append(summary(records, problems, elapsed))
    return "\n".join(lines)


def summary(records: Sequence[dict[str, Any]], problems: Sequence[Problem], elapsed: float) -> str:
    if not problems:
        return f"preflight: passed, {len(records)} rank(s), in {elapsed:.1f} s"
    parts = []
    for kind, word in (("fail", "failing"), ("lag", "lagging")):
        ranks = sorted({r for p in problems if p.kind == kind for r in p.ranks})
        job_wide = any(p.kind == kind and not p.ranks for p in problems)
        if ranks:
            hosts = sorted({records[r]["host"] for r in ranks})
            parts.append(f"{word}: rank(s) {_some(ranks)} on host(s) {_some(hosts)}")
        elif job_wide:
            parts.append(f"{word}: the job's layout")
    return f"preflight: FAILED, {len(problems)} problem(s) ({'; '.join(parts)}), in {elapsed:.1f} s"


def _row(record: dict[str, Any], ratio: float, link: dict[str, float] | None, problems: Sequence[Problem]) -> str:
    compute, probe = record["compute"], record.get("folder") or {}
    kinds = sorted({p.kind.upper() for p in problems if record["rank"] in p.ranks})
    share = _median(compute["cpu_share"]) if record["device"] == "cpu" else math.nan
    free = probe.get("free_bytes")
    return _line([str(record["rank"]), record["host"], f"{record['local_rank']}/{record['local_world_size']}",
                  record["device"], f"{record['threads']}/{len(record['cpus'])}",
                  _num(_median(compute["gflops"]), 1), _num(ratio, 2), _num(share * 100, 0),
                  _num(link["latency_us"] if link else None, 0), _num(link["mb_s"] if link else None, 0),
                  _num(probe.get("write_mb_s"), 0), _num(free / 2**30 if free is not None else None, 1),
                  " ".join(kinds) or "ok"])


def _some(items: Sequence[Any], shown: int = 8) -> str:
    """The first ``shown`` items, then how many there are: a job of 512 ranks stays one line."""
    head = ", ".join(map(str, items[:shown]))
    return head if len(items) <= shown else f"{head}, ... ({len(items)} in all)"


def _num(value: float | None, digits: int) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan
