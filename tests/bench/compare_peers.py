"""anndist side by side with a hand-written DDP loop, Accelerate and Lightning (run by hand, not in CI).

Every runner (tests/bench/peers/) trains the same workload (peers/workload.py) under
``torchrun --standalone``; runners alternate A B C D A B C D ... over the repetitions so drift cancels.
Per runner it prints the median steady-state step time (warm-up steps excluded), its ratio to the
hand-written loop in the same repetition (median and range over repetitions), the time from launch
to the end of the first optimizer step, the whole-process time, the largest absolute difference of
the final weights (every rank, every repetition) from the hand-written loop's, and, from separate
``--audit`` runs, gradient all-reduce rounds (and buckets) and other collectives per optimizer step.

    python tests/bench/compare_peers.py            # full: 3 repetitions, both sizes, 2 and 1 processes
    python tests/bench/compare_peers.py --quick    # a check that everything runs (3-5 minutes)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PEERS = HERE / "peers"
sys.path.insert(0, str(PEERS))
import workload  # noqa: E402

RUNNERS = {"hand-written": "handwritten.py", "anndist": "anndist_runner.py",
           "accelerate": "accelerate_runner.py", "lightning": "lightning_runner.py"}
REFERENCE = "hand-written"
DESCRIPTION = {"small": "MLP 64-256-10 on digits, batch 32/rank",
               "large": "MLP 512-3x2048-10 on synthetic data, batch 64/rank"}
DEFAULT_STEPS = {"small": 200, "large": 16}
DEFAULT_WARMUP = {"small": 20, "large": 3}
QUICK_STEPS = {"small": 40, "large": 6}
QUICK_WARMUP = {"small": 5, "large": 2}
AUDIT_STEPS = 6
TARGETS = {"small": 1.03, "large": 1.01}  # anndist's step time at most this times the hand-written loop's


@dataclass
class Run:
    runner: str
    size: str
    nproc: int
    rep: int
    step_s: float
    cpu_s: float
    first_step_s: float
    process_s: float
    weight_diff: float = float("nan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition and few steps: checks, not figures")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of A B C D (default 3, quick 1)")
    parser.add_argument("--sizes", default="small,large", help="comma-separated: small, large")
    parser.add_argument("--nprocs", default="2,1", help="comma-separated process counts")
    parser.add_argument("--runners", default=",".join(RUNNERS), help=f"comma-separated, from {list(RUNNERS)}")
    parser.add_argument("--steps", type=int, nargs=2, metavar=("SMALL", "LARGE"), default=None,
                        help=f"optimizer steps per run (default {DEFAULT_STEPS['small']} {DEFAULT_STEPS['large']})")
    parser.add_argument("--warmup", type=int, nargs=2, metavar=("SMALL", "LARGE"), default=None,
                        help="first steps left out of the steady-state figure")
    parser.add_argument("--no-audit", action="store_true", help="skip the runs that count collectives")
    parser.add_argument("--compile", action="store_true",
                        help="every runner torch.compiles the model (the first steps compile: raise --warmup)")
    parser.add_argument("--json", default=None, help="also write every run's figures here")
    parser.add_argument("--keep", default=None, help="keep datasets, logs and weights in this folder")
    args = parser.parse_args(argv)
    _resolve(args, parser)
    return args


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    args.reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.nprocs = [int(n) for n in args.nprocs.split(",") if n]
    args.runners = [r for r in args.runners.split(",") if r]
    steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    warmup = QUICK_WARMUP if args.quick else DEFAULT_WARMUP
    args.steps = dict(zip(("small", "large"), args.steps)) if args.steps else dict(steps)
    args.warmup = dict(zip(("small", "large"), args.warmup)) if args.warmup else dict(warmup)
    if bad := [s for s in args.sizes if s not in workload.SIZES]:
        parser.error(f"--sizes {bad} unknown; choose from {sorted(workload.SIZES)}")
    if bad := [r for r in args.runners if r not in RUNNERS]:
        parser.error(f"--runners {bad} unknown; choose from {list(RUNNERS)}")
    if REFERENCE not in args.runners:
        parser.error(f"--runners must include {REFERENCE!r}: it is the reference for ratios and weights")
    if args.reps < 1 or any(n < 1 for n in args.nprocs):
        parser.error("--reps and --nprocs must be >= 1")
    for size in args.sizes:
        if not 0 <= args.warmup[size] < args.steps[size] - 1:
            parser.error(f"{size}: warm-up {args.warmup[size]} must leave at least 2 of {args.steps[size]} steps")


# --------------------------------------------------------------------------- data
def write_dataset(folder: Path, size: str, nproc: int, steps: int) -> Path:
    """Exactly ``steps * K * batch * nproc`` samples, so one epoch is ``steps`` optimizer steps."""
    path = folder / f"data-{size}-{nproc}p-{steps}s.pt"
    if path.exists():
        return path
    spec = workload.SIZES[size]
    count = steps * workload.K * spec.batch * nproc
    if size == "small":
        sys.path.insert(0, str(ROOT / "launch"))
        from train_digits import digits_datasets
        x, y = digits_datasets()[0].tensors
        index = torch.arange(count) % len(x)  # the train split, repeated to fill the steps
        x, y = x[index], y[index]
    else:
        generator = torch.Generator().manual_seed(workload.SEED)
        x = torch.randn(count, spec.inputs, generator=generator)
        teacher = torch.randn(spec.inputs, spec.classes, generator=generator)
        y = (x @ teacher).argmax(dim=1)  # learnable labels
    torch.save({"x": x.contiguous(), "y": y.contiguous()}, path)
    return path


# --------------------------------------------------------------------------- launching
def child_env() -> dict[str, str]:
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_", "SLURM_", "TORCHELASTIC", "PL_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher_vars)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))  # this checkout's anndist
    return env


def launch(runner: str, size: str, nproc: int, steps: int, data: Path, out: Path,
           audit: bool, compile_model: bool = False) -> tuple[list[dict], float, float]:
    """Run one runner under torchrun; return every rank's result, the launch wall time and the process time."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(PEERS / RUNNERS[runner]), "--size", size, "--data", str(data), "--steps", str(steps), "--out", str(out)]
    cmd += ["--audit"] if audit else []
    cmd += ["--compile"] if compile_model else []
    launched_wall, launched = time.time(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    process_s = time.perf_counter() - launched
    Path(f"{out}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"{runner} ({size}, {nproc} processes) exited {proc.returncode}:\n{tail}")
    results = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)]
    for result in results:
        if len(result["step_ends"]) != steps:
            raise RuntimeError(f"{runner} took {len(result['step_ends'])} optimizer steps, expected {steps}")
    return results, launched_wall, process_s


def weight_diff(out: Path, nproc: int, reference: torch.Tensor) -> float:
    """Largest |w - w_ref| over every rank's final weights."""
    return max((torch.load(f"{out}.rank{r}.pt") - reference).abs().max().item() for r in range(nproc))


def timed_run(runner: str, size: str, nproc: int, rep: int, args: argparse.Namespace, folder: Path,
              references: dict) -> Run:
    steps, warmup = args.steps[size], args.warmup[size]
    data = write_dataset(folder, size, nproc, steps)
    out = folder / f"{runner}-{size}-{nproc}p-rep{rep}"
    results, launched_wall, process_s = launch(runner, size, nproc, steps, data, out, audit=False,
                                               compile_model=args.compile)
    run = Run(runner, size, nproc, rep, step_s=steady_median(results[0]["step_ends"], warmup),
              cpu_s=steady_median(results[0]["cpu_ends"], warmup),
              first_step_s=results[0]["first_step_wall"] - launched_wall, process_s=process_s)
    key = (size, nproc)
    if runner == REFERENCE and key not in references:
        references[key] = torch.load(f"{out}.rank0.pt")
    run.weight_diff = weight_diff(out, nproc, references[key])
    return run


def steady_median(ends: list[float], warmup: int) -> float:
    """Median time between consecutive step ends, leaving out the first ``warmup`` steps."""
    return statistics.median(b - a for a, b in list(zip(ends, ends[1:]))[warmup:])  # pair i ends step i + 1


def audit_run(runner: str, size: str, nproc: int, folder: Path) -> dict:
    data = write_dataset(folder, size, nproc, AUDIT_STEPS)
    out = folder / f"audit-{runner}-{size}-{nproc}p"
    results, _, _ = launch(runner, size, nproc, AUDIT_STEPS, data, out, audit=True)
    counts = [r["audit"] for r in results]
    if any(c != counts[0] for c in counts):
        raise RuntimeError(f"{runner}: ranks counted different collectives: {counts}")
    return counts[0]


# --------------------------------------------------------------------------- reporting
def summarize(runs: list[Run], runner: str) -> dict:
    mine = sorted((r for r in runs if r.runner == runner), key=lambda r: r.rep)
    reference = {r.rep: r.step_s for r in runs if r.runner == REFERENCE}
    ratios = [r.step_s / reference[r.rep] for r in mine]
    return {"step_ms": 1e3 * statistics.median(r.step_s for r in mine),
            "cpu_ms": 1e3 * statistics.median(r.cpu_s for r in mine), "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "first_step_s": statistics.median(r.first_step_s for r in mine),
            "process_s": statistics.median(r.process_s for r in mine),
            "weight_diff": max(r.weight_diff for r in mine)}


def audit_text(counts: dict | None) -> tuple[str, str]:
    if not counts:
        return "-", "-"
    grads = f"{counts['rounds']:g} ({counts['buckets']:g} bucket{'s' if counts['buckets'] != 1 else ''})"
    other = ", ".join(f"{n:g} {name}" for name, n in sorted(counts["other"].items())) or "none"
    return grads, other


def print_table(size: str, nproc: int, runs: list[Run], audits: dict, args: argparse.Namespace) -> dict:
    print(f"\n{size}{' (compiled)' if args.compile else ''}: {DESCRIPTION[size]}, K={workload.K}, {args.steps[size]} optimizer steps "
          f"({args.warmup[size]} warm-up), {nproc} process{'es' if nproc > 1 else ''}, {args.reps} repetition(s)")
    header = (f"{'runner':<13}{'step ms':>9}{'cpu ms':>8}  {'x hand-written [range]':<24}{'first step s':>13}"
              f"{'process s':>11}{'max |dw|':>10}  {'grad all-reduce/step':<22}other collectives/step")
    print(header)
    print("-" * len(header))
    summary = {}
    for runner in args.runners:
        s = summary[runner] = summarize(runs, runner)
        grads, other = audit_text(audits.get((runner, size, nproc)))
        spread = f"{s['ratio']:.3f} [{s['ratio_min']:.3f}-{s['ratio_max']:.3f}]"
        print(f"{runner:<13}{s['step_ms']:>9.3f}{s['cpu_ms']:>8.3f}  {spread:<24}{s['first_step_s']:>13.2f}"
              f"{s['process_s']:>11.2f}{s['weight_diff']:>10.1e}  {grads:<22}{other}")
    return summary


def print_targets(summaries: dict, audits: dict) -> None:
    print("\ntargets (anndist):")
    for (size, nproc), summary in summaries.items():
        if "anndist" not in summary or nproc < 2:
            continue
        mine = summary["anndist"]
        peers = {r: s["ratio"] for r, s in summary.items() if r not in ("anndist", REFERENCE)}
        verdict = "met" if mine["ratio"] <= TARGETS[size] else "MISSED"
        line = f"  {size}, {nproc} processes: {mine['ratio']:.3f}x hand-written (target <= {TARGETS[size]}x: {verdict})"
        if size == "small" and peers:
            below = all(mine["ratio"] < ratio for ratio in peers.values())
            line += f"; below {', '.join(f'{r} {x:.3f}x' for r, x in peers.items())}: {'yes' if below else 'NO'}"
        print(line)
    for (runner, size, nproc), counts in audits.items():
        if runner == "anndist" and counts:
            print(f"  {size}, {nproc} processes: {counts['rounds']:g} gradient all-reduce round(s) per optimizer step")
    worst = max(s["weight_diff"] for summary in summaries.values() for s in summary.values())
    print(f"  largest final-weight difference from the hand-written loop, any runner: {worst:.1e}")


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.startswith("model name")]
    versions = [f"torch {torch.__version__}"]
    for name in ("accelerate", "lightning"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            versions.append(f"{name} not installed")
    cpu = models[0] if models else platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {', '.join(versions)}"


LEGEND = """
step ms: median time between the ends of consecutive optimizer steps (K micro-batches, data loading included),
  warm-up left out, median over repetitions (rank 0); cpu ms: the same in process CPU time (steadier on a busy
  machine); x hand-written: step ms over the hand-written loop's in the same repetition, median [min-max];
first step s: from launching torchrun to the end of the first optimizer step; process s: launch to exit;
max |dw|: largest |w - w_ref| of the final weights, any rank and repetition, against the hand-written loop's;
grad all-reduce/step: DDP gradient all-reduce rounds per optimizer step (buckets per round), from --audit runs;
other collectives/step: every other torch.distributed collective per optimizer step, steady state."""


# --------------------------------------------------------------------------- main
def run_all(args: argparse.Namespace, folder: Path) -> tuple[list[Run], dict]:
    runs: list[Run] = []
    audits: dict = {}
    references: dict = {}
    for size in args.sizes:
        for nproc in args.nprocs:
            if not args.no_audit and nproc > 1:
                for runner in args.runners:
                    audits[(runner, size, nproc)] = audit_run(runner, size, nproc, folder)
            for rep in range(args.reps):
                for runner in sorted(args.runners, key=lambda r: r != REFERENCE):  # the reference first
                    runs.append(timed_run(runner, size, nproc, rep, args, folder, references))
                    print(f"  {size} {nproc}p rep {rep}: {runner:<13}{1e3 * runs[-1].step_s:8.3f} ms/step", flush=True)
    return runs, audits


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    with tempfile.TemporaryDirectory(prefix="compare_peers-") as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        runs, audits = run_all(args, folder)
    summaries = {}
    for size in args.sizes:
        for nproc in args.nprocs:
            mine = [r for r in runs if (r.size, r.nproc) == (size, nproc)]
            summaries[(size, nproc)] = print_table(size, nproc, mine, audits, args)
    print(LEGEND)
    print_targets(summaries, audits)
    print(f"\nload average {os.getloadavg()[0]:.2f} at end; total {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine(), "args": {k: v for k, v in vars(args).items()},
            "runs": [vars(r) for r in runs],
            "audits": [{"runner": k[0], "size": k[1], "nproc": k[2], **v} for k, v in audits.items()],
            "summaries": [{"size": k[0], "nproc": k[1], "runner": r, **s}
                          for k, v in summaries.items() for r, s in v.items()],
        }, indent=1))


if __name__ == "__main__":
    main()
