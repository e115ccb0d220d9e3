"""Draw a run's metrics.jsonl: loss, accuracy, learning rate and throughput in one PNG.

    python -m anndist.plot RUN_DIR/metrics.jsonl -o curves.png

Needs matplotlib (``pip install 'anndist[plot]'``; ``anndist[examples]`` includes it). A resumed run that went back to an older
checkpoint logs some steps twice; the later record of a step wins, and each resume is drawn as a
dotted vertical line.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Sequence

from .callbacks.jsonl import read_jsonl
from .optional import MissingDependencyError, require

Curve = tuple[list[float], list[float]]
_LABELS = {"loss": "train loss (logging interval)", "epoch train_loss": "train loss (epoch)",
           "epoch val_loss": "val loss", "epoch val_accuracy": "val accuracy"}


def load_curves(records: Sequence[dict[str, Any]]) -> dict[str, Curve]:
    """``{name: (steps, values)}`` for step and epoch metrics, the later record of a step winning."""
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for record in records:
        if record.get("kind") in ("step", "epoch"):
            latest[(record["kind"], record["step"])] = record
    curves: dict[str, Curve] = {}
    for (kind, step), record in sorted(latest.items(), key=lambda item: item[0][1]):
        for name, value in record.items():
            if name in ("kind", "time", "epoch", "step") or not isinstance(value, (int, float)):
                continue
            steps, values = curves.setdefault(name if kind == "step" else f"epoch {name}", ([], []))
            steps.append(step)
            values.append(value)
    return curves


def resumes(records: Sequence[dict[str, Any]]) -> list[int]:
    """The optimizer steps at which a later fit (a resume or requeue) continued the file."""
    starts = [record["step"] for record in records if record.get("kind") == "start"]
    return starts[1:]


def plot_metrics(metrics: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the four panels of ``metrics`` (a metrics.jsonl) to the PNG ``out``; return its path."""
    require("matplotlib", "plotting")  # a one-line error naming the pip command
    from matplotlib.figure import Figure
    records = read_jsonl(metrics)
    curves = load_curves(records)
    if not curves:
        raise ValueError(f"{metrics} holds no step or epoch records; was it written by LoggingCallback(log_dir=...)?")
    figure = Figure(figsize=(11, 7), layout="constrained")
    axes = figure.subplots(2, 2, sharex=True)
    panels = [("loss", ["loss", "epoch train_loss", "epoch val_loss"]), ("accuracy", ["epoch val_accuracy"]),
              ("learning rate", ["lr"]), ("samples/s (whole job)", ["samples_per_s"])]
    for ax, (title, names) in zip(axes.flat, panels):
        _panel(ax, title, [(name, curves[name]) for name in names if name in curves], resumes(records))
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    figure.suptitle(str(metrics))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return out


def _panel(ax: Any, title: str, curves: list[tuple[str, Curve]], resumed_at: list[int]) -> None:
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if not curves:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    for name, (steps, values) in curves:
        style = {"marker": "o"} if name.startswith("epoch") else {}
        ax.plot(steps, values, label=_LABELS.get(name, name), **style)
    for step in resumed_at:
        ax.axvline(step, color="gray", linestyle=":", linewidth=1)
    if len(curves) > 1:
        ax.legend()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m anndist.plot", description=__doc__.splitlines()[0])
    parser.add_argument("metrics", help="a metrics.jsonl written by LoggingCallback(log_dir=...)")
    parser.add_argument("-o", "--output", default=None, help="PNG to write (default: curves.png next to the metrics)")
    args = parser.parse_args(argv)
    if not Path(args.metrics).is_file():
        parser.error(f"metrics file {args.metrics!r} does not exist; pass RUN_DIR/metrics.jsonl")
    try:
        out = plot_metrics(args.metrics, args.output or Path(args.metrics).with_name("curves.png"))
    except MissingDependencyError as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")  # one line, not a traceback
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
