"""The end-of-training profile: one rank's summary, the all-rank table, and the straggler rule.

In DDP every rank waits for the slowest inside backward (the gradient all-reduce), so step times
agree across ranks and cannot name the culprit. What differs is the time a rank spends *outside*
backward (data wait + forward + optimizer step): the straggler is the rank whose median of that
time is more than ``STRAGGLER_THRESHOLD`` above the median over ranks.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

STRAGGLER_THRESHOLD = 0.10
PHASES = ("data", "forward", "backward", "optimizer")


def summarize(rank: int, host: str, times_ms: dict[str, Sequence[float]], samples: int,
              peak_memory: int | None, memory_kind: str | None,
              model_state: dict[str, int] | None = None, traced: int = 0) -> dict[str, Any]:
    """One rank's figures from its per-step times in ms (keys: step, local and PHASES); ``model_state``:
    the bytes of parameters, gradients and optimizer state this rank holds (``memory.py``); ``traced``:
    the optimizer steps left out of the times because the profiler traced them."""
    step = np.asarray(times_ms["step"], dtype=np.float64)
    summary: dict[str, Any] = {"rank": rank, "host": host, "steps": int(step.size), "samples": samples,
                               "peak_memory": peak_memory, "memory_kind": memory_kind, "model_state": model_state,
                               "traced_steps": traced}
    if step.size == 0:
        return summary
    summary["step_ms"] = {"p50": float(np.percentile(step, 50)), "p90": float(np.percentile(step, 90)),
                          "max": float(step.max())}
    for phase in (*PHASES, "local"):
        summary[f"{phase}_ms"] = float(np.median(np.asarray(times_ms[phase], dtype=np.float64)))
    total_s = float(step.sum()) / 1e3
    summary["samples_per_s"] = samples / total_s if total_s > 0 else float("nan")
    return summary


def find_straggler(summaries: Sequence[dict[str, Any]]) -> tuple[int, float, float] | None:
    """``(rank, its local ms, median local ms)`` of the straggler, or None when every rank keeps up."""
    timed = [s for s in summaries if "local_ms" in s]
    if len(timed) < 2:
        return None
    median = float(np.median([s["local_ms"] for s in timed]))
    slowest = max(timed, key=lambda s: s["local_ms"])
    if slowest["local_ms"] > (1 + STRAGGLER_THRESHOLD) * median:
        return slowest["rank"], slowest["local_ms"], median
    return None


def format_table(summaries: Sequence[dict[str, Any]]) -> str:
    """The table rank 0 prints: a row per rank, the job's samples/s, and the straggler verdict."""
    steps = sorted({s["steps"] for s in summaries})
    traced = max(s.get("traced_steps", 0) for s in summaries)
    counted = f"{'/'.join(map(str, steps))} optimizer steps per rank"
    if traced:  # the run took more steps than the table times
        counted = (f"{'/'.join(str(n + traced) for n in steps)} optimizer steps per rank, {counted.split()[0]} "
                   f"timed ({traced} traced by torch.profiler left out)")
    lines = [f"profile: {counted}; times in ms, phases are medians per step, backward includes the gradient "
             "all-reduce",
             f"{'rank':>4}  {'host':<12} {'step p50':>8} {'p90':>7} {'max':>7} {'data':>7} {'forward':>7} "
             f"{'backward':>8} {'optim':>7} {'samples/s':>10}  peak memory"]
    for s in sorted(summaries, key=lambda s: s["rank"]):
        lines.append(_row(s))
    total = sum(s.get("samples_per_s", 0.0) for s in summaries if not s.get("replica"))  # each sample once
    lines.append(f"{'all':>4}  {'':<12} {'':>8} {'':>7} {'':>7} {'':>7} {'':>7} {'':>8} {'':>7} {total:>10.0f}")
    lines.append(_verdict(summaries))
    return "\n".join(lines)


def _row(s: dict[str, Any]) -> str:
    head = f"{s['rank']:>4}  {s['host'][:12]:<12}"
    if "step_ms" not in s:
        return f"{head} (no optimizer step timed)"
    step = s["step_ms"]
    phases = " ".join(f"{s[f'{p}_ms']:>{8 if p == 'backward' else 7}.2f}" for p in PHASES)
    return (f"{head} {step['p50']:>8.2f} {step['p90']:>7.2f} {step['max']:>7.2f} {phases} "
            f"{s['samples_per_s']:>10.0f}  {_memory(s)}")


def _memory(s: dict[str, Any]) -> str:
    peak = "-" if s.get("peak_memory") is None else f"{s['peak_memory'] / 2**20:.0f} MiB ({s['memory_kind']})"
    state = s.get("model_state")
    if not state:
        return peak
    return f"{peak}; model state {sum(state.values()) / 2**20:.1f} MiB (params+grads+optimizer, this rank)"


def _verdict(summaries: Sequence[dict[str, Any]]) -> str:
    found = find_straggler(summaries)
    if found is None:
        if len([s for s in summaries if "local_ms" in s]) < 2:
            return "straggler check needs two ranks or more"
        return (f"no straggler: every rank's time outside backward is within "
                f"{STRAGGLER_THRESHOLD:.0%} of the median")
    rank, local, median = found
    return (f"straggler: rank {rank} spends {local:.2f} ms per step outside backward (data wait + forward + "
            f"optimizer), {local / median - 1:.0%} more than the median {median:.2f} ms; the other ranks "
            "wait for it in the all-reduce")
