"""MLflow and W&B callbacks in one process: one tracker run across a resume in a new Trainer (a requeue),
steps that only increase, the values of the metrics records (written by rank 0 alone:
tests/multiprocess/test_trackers.py).

Skipped when the tracker package is missing (``pip install 'anndist[mlflow]'`` / ``'anndist[wandb]'``).
"""
import os
import sys

import pytest
from torch.utils.data import DataLoader

from anndist import MetricsCallback, MissingDependencyError, MLflowCallback, WandbCallback
from anndist.callbacks import trackers
from support import make_dataset
from support.trackers import mlflow_history, tracker_loader, tracker_trainer, wandb_history

STEPS_PER_EPOCH = 4  # 32 samples, batch 8


class Records(MetricsCallback):
    """The records every writer receives, for comparison."""

    def __init__(self):
        super().__init__(log_interval=2)
        self.records = []

    def write(self, record):
        self.records.append(record)


def _expected(records):
    """``{metric name: [(step, value), ...]}`` as the trackers name the records' values."""
    expected = {}
    for record in records:
        group = trackers.GROUPS.get(record["kind"])
        for name, value in record.items():
            if group and name not in trackers.NOT_METRICS:
                expected.setdefault(f"{group}/{name}", []).append((record["step"], value))
    return expected


def _assert_same(actual, expected, key):
    """Same steps; same values except timings (each MetricsCallback times its own interval)."""
    assert [step for step, _ in actual] == [step for step, _ in expected], key
    if key not in ("train/samples_per_s", "epoch/epoch_time"):
        assert [value for _, value in actual] == pytest.approx([value for _, value in expected], rel=1e-6), key


def _process_exit(tracker):
    """What W&B does when a process exits: finish the run, then wait for its service to write it all."""
    if isinstance(tracker, WandbCallback):
        import wandb

        tracker.finish()
        wandb.teardown()  # finish() may return before the service has written the run's file


def _run_then_resume(tmp_path, make_tracker, first_epochs=1, saved_after=1, total_epochs=3):
    """Train, save a checkpoint after ``saved_after`` epochs, go on to ``first_epochs``; then a new
    Trainer and tracker (a new process, as after a requeue) load it and train to ``total_epochs``.

    Returns both trackers and the records the tracker should hold: the first attempt's, then the
    resumed attempt's past the first attempt's last step (the re-trained steps are not sent again).
    """
    before, after = Records(), Records()
    first = tracker_trainer(make_tracker(), before)
    first.fit(tracker_loader(), num_epochs=saved_after)
    path = first.save_checkpoint(tmp_path / "run.ckpt")
    first.fit(tracker_loader(), num_epochs=first_epochs)  # steps after the checkpoint: logged, then lost by a crash
    _process_exit(first.callbacks.callbacks[0])
    tracker = make_tracker()
    second = tracker_trainer(tracker, after)
    second.load_checkpoint(path)
    second.fit(tracker_loader(), num_epochs=total_epochs)
    _process_exit(tracker)
    last = max(r["step"] for r in before.records)
    again = {r["step"]: r["loss"] for r in after.records if r["kind"] == "step" and r["step"] <= last}
    assert again == {r["step"]: r["loss"] for r in before.records if r["kind"] == "step" and r["step"] in again}
    return first.callbacks.callbacks[0], tracker, before.records + [r for r in after.records if r["step"] > last]


# ---------------------------------------------------------------- MLflow
@pytest.mark.parametrize("first_epochs", [1, 2], ids=["saved-at-the-end", "crashed-after-the-save"])
def test_mlflow_one_run_across_a_resume_with_increasing_steps(tmp_path, first_epochs, mlflow):
    uri = f"file:{tmp_path}/mlruns"
    first, resumed, records = _run_then_resume(
        tmp_path, lambda: MLflowCallback(uri, experiment="tests", run_name="digits", log_interval=2), first_epochs)
    assert resumed.run_id == first.run_id is not None
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"  # set for the file store, which MLflow 3 refuses otherwise
    runs, history = mlflow_history(uri, "tests")
    assert [(r.info.run_id, r.info.run_name, r.info.status) for r in runs] == [(first.run_id, "digits", "FINISHED")]
    assert runs[0].data.params["world_size"] == "1" and runs[0].data.params["optimizer"] == "SGD"
    for key, points in history.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), key  # increasing: no step twice, even those re-trained after the crash
    expected = _expected(records)
    assert set(history) == set(expected) >= {"train/loss", "train/lr", "train/samples_per_s", "epoch/train_loss"}
    for key, points in expected.items():
        _assert_same(history[key], points, key)
    assert [step for step, _ in history["train/loss"]] == list(range(2, 3 * STEPS_PER_EPOCH + 1, 2))


def test_mlflow_evaluate_outside_fit_logs_to_the_same_run(tmp_path, mlflow):
    uri = f"file:{tmp_path}/mlruns"
    tracker = MLflowCallback(uri, experiment="tests", log_interval=2)
    trainer = tracker_trainer(tracker)
    trainer.fit(tracker_loader(), num_epochs=1)
    metrics = trainer.evaluate(DataLoader(make_dataset(16, seed=1), batch_size=8))
    runs, history = mlflow_history(uri, "tests")
    assert len(runs) == 1 and history["eval/val_loss"] == [(STEPS_PER_EPOCH, pytest.approx(metrics["val_loss"]))]


# ---------------------------------------------------------------- W&B
def test_wandb_offline_run_resumed_with_the_same_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed: pip install 'anndist[wandb]'")
    monkeypatch.setenv("WANDB_SILENT", "true")
    folder = tmp_path / "wb"
    first, resumed, records = _run_then_resume(
        tmp_path, lambda: WandbCallback("tests", mode="offline", dir=folder, log_interval=2), total_epochs=2)
    assert resumed.run_id == first.run_id is not None
    ids, configs, history = wandb_history(str(folder))
    assert ids == [first.run_id, first.run_id]  # one offline folder per attempt, one run id
    assert configs[0]["world_size"] == 1 and "world_size" not in configs[1]  # params once, at creation
    expected = _expected(records)
    assert set(history) == set(expected)
    for key, points in expected.items():
        _assert_same(history[key], points, key)


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("make, error, match", [
    (lambda: MLflowCallback(tracking_uri=3), TypeError, "tracking_uri must be a URI"),
    (lambda: MLflowCallback(experiment=""), TypeError, "experiment must be a non-empty string, got str ''"),
    (lambda: MLflowCallback(run_name=5), TypeError, "run_name must be a non-empty string or None"),
    (lambda: MLflowCallback(log_interval=0), ValueError, "log_interval=0 must be an int >= 1"),
    (lambda: WandbCallback(None), TypeError, "project must be a non-empty string, got NoneType"),
    (lambda: WandbCallback("p", mode="cloud"), ValueError, r"mode='cloud' is not one of \['online', 'offline', "),
    (lambda: WandbCallback("p", dir=1), TypeError, "dir must be a path"),
])
def test_bad_arguments_name_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_missing_tracker_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # find_spec then says: not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MissingDependencyError, match=r"^MLflowCallback needs mlflow-skinny, which is not installed: "
                                                     r"pip install 'anndist\[mlflow\]'$"):
        MLflowCallback()
    with pytest.raises(MissingDependencyError, match=r"^WandbCallback needs wandb, which is not installed: "
                                                     r"pip install 'anndist\[wandb\]'$"):
        WandbCallback("p")


def test_file_store_uris():
    assert trackers._is_file_store("file:runs/mlruns") and trackers._is_file_store("runs/mlruns")
    assert not any(map(trackers._is_file_store, ["sqlite:///m.db", "http://host:5000", "databricks"]))
