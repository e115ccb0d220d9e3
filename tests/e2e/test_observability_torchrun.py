"""The digits example under real torchrun with 2 ranks, each rank's output in its own file (one
run serves every test): each line once, the bar on rank 0 only, a valid metrics.jsonl appended to
the one an earlier job left, the profiling table with every rank, parseable traces, and the PNG."""
import json
import re
import subprocess
import sys

import pytest

from anndist.callbacks.logging import format_record
from support import ROOT, child_env, torchrun

TRACE_STEPS = (3, 6)
# What an earlier (requeued) job left in the folder: the new processes must append after it.
EARLIER_PROCESS = [{"kind": "start", "time": 1.0, "epoch": 0, "step": 0, "world_size": 2},
                   {"kind": "step", "time": 2.0, "epoch": 0, "step": 10, "loss": 2.5, "lr": 0.001, "samples_per_s": 1.0}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("digits")
    run_dir, outputs = tmp / "run", tmp / "torchrun"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EARLIER_PROCESS))
    torchrun(ROOT / "launch" / "train_digits.py", "--epochs", "2", "--log-interval", "10",
             "--log-dir", str(run_dir), "--profile", "--trace-steps", *map(str, TRACE_STEPS), "--progress-bar",
             torchrun_args=("--redirects", "3", "--log-dir", str(outputs)))
    streams = {}
    for rank in (0, 1):
        (rank_dir,) = outputs.glob(f"*/attempt_0/{rank}")
        streams[rank] = (rank_dir / "stderr.log").read_text() + (rank_dir / "stdout.log").read_text()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
               for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"dir": run_dir, "out": streams, "all_records": records, "records": records[len(EARLIER_PROCESS):]}


def test_metrics_file_is_valid_and_continued_by_a_new_job(run):
    assert run["all_records"][:len(EARLIER_PROCESS)] == EARLIER_PROCESS
    records = run["records"]
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "start" and records[0]["world_size"] == 2
    assert kinds.count("epoch") == 2 and kinds.count("step") == 4  # 23 steps per epoch, a line every 10
    steps = [r["step"] for r in records]
    assert steps == sorted(steps) and [r["step"] for r in records if r["kind"] == "step"] == [10, 20, 30, 40]
    assert all(0 < r["val_accuracy"] <= 1 for r in records if r["kind"] == "epoch")


def test_each_line_is_printed_once_by_rank_0(run):
    rank0, rank1 = run["out"][0], run["out"][1]
    for record in run["records"]:
        line = format_record(record)
        assert rank0.count(line) == 1, line
        assert line not in rank1
    assert "epoch 0 step" not in rank1 and "profile:" not in rank1


def test_progress_bar_only_on_rank_0(run):
    assert re.search(r"epoch 1: 100%\|.*\| 23/23", run["out"][0])
    assert "batch/s" not in run["out"][1]


def test_profiling_table_has_every_rank(run):
    lines = run["out"][0].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("profile: "))
    rows = [line.split() for line in lines[start + 2:start + 5]]
    assert [row[0] for row in rows] == ["0", "1", "all"]
    for row in rows[:2]:  # step p50 <= p90 <= max, all positive
        p50, p90, peak = map(float, row[2:5])
        assert 0 < p50 <= p90 <= peak
    assert re.match(r"(no straggler|straggler: rank [01] )", lines[start + 5])
    assert run["out"][0].count("profile: ") == 1


def test_trace_files_exist_and_parse(run):
    for rank in (0, 1):
        trace = json.loads((run["dir"] / "traces" / f"rank{rank}.json").read_text())
        names = {event.get("name", "") for event in trace["traceEvents"]}
        assert {f"ProfilerStep#{s}" for s in range(*TRACE_STEPS)} <= names
        assert any(name.startswith("aten::") for name in names)
    assert "torch.profiler trace of optimizer steps 3-5" in run["out"][0]


def test_plot_writes_the_png(run, tmp_path):
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "-m", "anndist.plot", str(run["dir"] / "metrics.jsonl"), "-o", str(out)],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
