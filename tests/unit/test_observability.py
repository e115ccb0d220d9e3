"""Observability pieces in one process: the straggler rule, the bar's auto mode, the metrics file,
the plot's reading of resumed runs, argument checks, and a single-process fit with the bar."""
import io
import json
import logging

import pytest
import torch
from torch.utils.data import DataLoader

from anndist import LoggingCallback, ProfilingCallback, ProgressBarCallback, TensorBoardCallback, Trainer
from anndist.callbacks.profile_report import find_straggler, format_table
from anndist.callbacks.progress import progress_bar_wanted
from anndist.callbacks.jsonl import JsonlWriter, read_jsonl
from anndist.plot import load_curves, resumes
from support import make_dataset, make_model


def _summary(rank, local):
    return {"rank": rank, "host": "node", "steps": 10, "samples": 100, "peak_memory": 2**20,
            "memory_kind": "process peak RSS", "step_ms": {"p50": 5.0, "p90": 6.0, "max": 9.0},
            "data_ms": local / 2, "forward_ms": local / 4, "backward_ms": 5.0 - local, "optimizer_ms": local / 4,
            "local_ms": local, "samples_per_s": 1000.0}


def test_straggler_is_the_rank_more_than_10_percent_behind_the_median_outside_backward():
    slow = [_summary(0, 1.0), _summary(1, 1.05), _summary(2, 1.3), _summary(3, 0.98)]
    assert find_straggler(slow) == (2, 1.3, pytest.approx(1.025))
    table = format_table(slow)
    rows = [line for line in table.splitlines() if line.split()[0].isdigit()]
    assert [int(row.split()[0]) for row in rows] == [0, 1, 2, 3]
    assert "straggler: rank 2" in table and "4000" in table  # the job's samples/s is the sum
    close = [_summary(0, 1.0), _summary(1, 1.05), _summary(2, 1.09)]
    assert find_straggler(close) is None
    assert "no straggler" in format_table(close)
    assert find_straggler([_summary(0, 5.0)]) is None


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("setting, environ, stream, wanted", [
    (None, {}, _Tty(), True),
    (None, {}, io.StringIO(), False),          # a log file, a pipe
    (None, {"CI": "true"}, _Tty(), False),
    (None, {"GITHUB_ACTIONS": "true"}, _Tty(), False),
    (None, {"CI": "0"}, _Tty(), True),
    (True, {"CI": "1"}, io.StringIO(), True),  # explicit beats detection
    (False, {}, _Tty(), False),
])
def test_progress_bar_auto_mode(setting, environ, stream, wanted):
    assert progress_bar_wanted(setting, environ, stream) is wanted


def test_progress_bar_not_added_twice():
    assert not progress_bar_wanted(True, {}, _Tty(), [ProgressBarCallback()])


def test_metrics_file_continues_after_a_torn_line(tmp_path, caplog):
    path = tmp_path / "run" / "metrics.jsonl"
    writer = JsonlWriter(path)
    writer.write({"kind": "step", "step": 1, "loss": float("nan")})
    writer.close()
    with open(path, "a") as file:
        file.write('{"kind": "step", "st')  # a crash mid-line
    writer = JsonlWriter(path)
    writer.write({"kind": "step", "step": 2, "loss": 0.5})
    writer.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"kind": "step", "step": 1, "loss": None}  # strict JSON: NaN -> null
    assert lines[1] == '{"kind": "step", "st' and json.loads(lines[2])["step"] == 2
    with caplog.at_level(logging.WARNING, logger="anndist"):
        logging.getLogger("anndist").propagate = True
        try:
            assert [r["step"] for r in read_jsonl(path)] == [1, 2]
        finally:
            logging.getLogger("anndist").propagate = False
    assert "metrics.jsonl:2 is not valid JSON" in caplog.text


def test_plot_reads_a_resumed_run_later_records_winning():
    records = [
        {"kind": "start", "step": 0}, {"kind": "step", "step": 2, "loss": 3.0, "lr": 0.1},
        {"kind": "step", "step": 4, "loss": 2.0, "lr": 0.1}, {"kind": "epoch", "step": 4, "train_loss": 2.5},
        {"kind": "step", "step": 6, "loss": 9.0, "lr": 0.1},  # lost: the run resumed from step 4
        {"kind": "start", "step": 4}, {"kind": "step", "step": 6, "loss": 1.5, "lr": 0.05},
    ]
    curves = load_curves(records)
    assert curves["loss"] == ([2, 4, 6], [3.0, 2.0, 1.5])
    assert curves["lr"] == ([2, 4, 6], [0.1, 0.1, 0.05])
    assert curves["epoch train_loss"] == ([4], [2.5])
    assert resumes(records) == [4]


@pytest.mark.parametrize("make, match", [
    (lambda: LoggingCallback(log_interval=0), "log_interval=0"),
    (lambda: LoggingCallback(log_dir=3), "log_dir must be a path"),
    (lambda: ProfilingCallback(trace_steps=(1, 3)), "needs trace_dir"),
    (lambda: ProfilingCallback(trace_dir="t", trace_steps=(5, 2)), r"trace_steps=\(5, 2\)"),
    (lambda: ProfilingCallback(trace_dir="t", trace_steps=range(0, 9, 2)), "trace_steps=range"),
    (lambda: ProfilingCallback(profile_memory="yes"), "profile_memory"),
    (lambda: TensorBoardCallback(None), "log_dir must be a path"),
    (lambda: ProgressBarCallback(refresh_s=-1), "refresh_s=-1"),
])
def test_bad_arguments_name_the_argument(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


def test_trainer_progress_bar_option_is_checked():
    model = make_model()
    with pytest.raises(TypeError, match="progress_bar must be True, False or None"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), progress_bar="on")


def test_single_process_lines_file_bar_and_evaluate(tmp_path):
    """One process: the log lines print above the bar, the bar shows the epoch's figures, the handler
    is restored afterwards, and evaluate() outside fit logs (and appends) one eval record."""
    out = io.StringIO()
    model = make_model()
    logging_cb = LoggingCallback(log_interval=2, log_dir=tmp_path)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                      callbacks=[logging_cb, ProgressBarCallback(refresh_s=0, file=out)], seed=0)
    handler = next(h for h in logging.getLogger("anndist").handlers if h.get_name() == "anndist-rank-aware")
    stream = handler.stream
    trainer.fit(DataLoader(make_dataset(40), batch_size=8), num_epochs=2)  # 5 steps per epoch
    assert handler.stream is stream  # the bar gave the console back
    trainer.evaluate(DataLoader(make_dataset(16, seed=1), batch_size=8))
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [
        ("start", 0), ("step", 2), ("step", 4), ("epoch", 5), ("step", 6), ("step", 8), ("step", 10),
        ("epoch", 10), ("eval", 10)]
    text = out.getvalue()
    assert "epoch 0 step 2 | loss" in text and "epoch 1 | train_loss" in text  # printed above the bar
    assert "5/5" in text and "rank0 loss=" in text and f"train_loss={records[7]['train_loss']:.4f}" in text
