"""One table from a GPU run: the machine, each CUDA test's outcome, the benchmark's figures.

    python tests/gpu/summary.py --junit J.xml --bench B.json --info I.json --phases P.txt
Any input may be missing (a phase that failed or ran out of time): the table says so.
"""
from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path


def _tests(path: Path) -> list[tuple[str, str, str]]:
    if not path.is_file():
        return []
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return [("(junit file unreadable)", "error", str(exc))]
    rows = []
    for case in root.iter("testcase"):
        outcome, why = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                why = (node.get("message") or "").splitlines()[0][:90] if node.get("message") else ""
                break
        rows.append((case.get("name", "?"), outcome, why))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("junit", "bench", "info", "phases"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args()
    lines = ["=" * 100, "anndist on a GPU: summary", "=" * 100]
    info = json.loads(args.info.read_text()) if args.info.is_file() else {}
    for key in ("gpu", "gpus", "driver", "torch", "cuda", "cudnn", "nccl", "bf16", "python", "commit"):
        if key in info:
            lines.append(f"{key:8} {info[key]}")
    if args.phases.is_file():
        lines.append("")
        lines.append(f"{'phase':10} {'exit':>5} {'seconds':>8}")
        for line in args.phases.read_text().splitlines():
            phase, code, seconds = line.split()
            note = "  (timed out)" if code in ("124", "137") else ""
            lines.append(f"{phase:10} {code:>5} {seconds:>8}{note}")
    tests = _tests(args.junit)
    lines.append("")
    if tests:
        counts = {o: sum(1 for _, out, _ in tests if out == o) for o in ("passed", "FAILED", "ERROR", "skipped")}
        lines.append("tests/gpu/test_cuda.py: " + ", ".join(f"{n} {o}" for o, n in counts.items() if n))
        width = max(len(name) for name, _, _ in tests)
        for name, outcome, why in tests:
            lines.append(f"  {name:{width}}  {outcome:7}  {why}")
    else:
        lines.append("tests/gpu/test_cuda.py: no results (the phase did not run or did not finish)")
    lines.append("")
    bench = json.loads(args.bench.read_text()) if args.bench.is_file() else None
    if bench:
        lines.append(f"benchmark on {bench['name']} ({bench['device']}): median ms per optimizer step "
                     f"(K=4 micro-batches), {bench['rows'][0]['reps']} alternating runs each")
        lines.append(f"  {'model':6} {'precision':9} {'steps':>5} {'hand-written':>13} {'anndist':>9} {'overhead':>9}")
        for row in bench["rows"]:
            lines.append(f"  {row['size']:6} {row['precision']:9} {row['steps']:>5} {row['handwritten_ms']:13.3f} "
                         f"{row['anndist_ms']:9.3f} {row['overhead_pct']:+8.1f}%")
    else:
        lines.append("benchmark: no results (the phase did not run or did not finish)")
    lines.append("=" * 100)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
