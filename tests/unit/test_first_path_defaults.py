"""Defaults a person expects, in one process: what a run prints without any callback, a closing line
that is last and true, one "best" per run, "did you mean" for misspelt keywords, a missing optional
package in one line, the sampler mistake explained, the profile table's step count with tracing on.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import (Callback, EarlyStopping, LoggingCallback, MissingDependencyError, MLflowCallback,
                     ModelCheckpoint, ProfilingCallback, Trainer, WandbCallback)
from anndist.data import sampler_hint
from support import make_dataset, make_model
from support.early_stopping import Scripted


class Lines(logging.Handler):
    """Every record of the ``anndist`` logger (it does not propagate), INFO and up."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines():
    handler = Lines()
    logger = logging.getLogger("anndist")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def _trainer(callbacks=(), **options) -> Trainer:
    model = make_model()
    options = {"progress_bar": False, "handle_signals": False, "seed": 0, **options}
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                   callbacks=list(callbacks), **options)


def _loaders(n=16):
    return DataLoader(make_dataset(n), batch_size=8, shuffle=True), DataLoader(make_dataset(8, seed=1), batch_size=8)


# ------------------------------------------------------------------ what a run prints by default
def test_without_any_callback_a_run_prints_a_line_per_epoch_and_a_closing_line(lines):
    train, val = _loaders()
    history = _trainer().fit(train, num_epochs=2, val_loader=val)
    assert [line.split(" | ")[0] for line in lines] == ["epoch 0", "epoch 1", lines[-1].split(" | ")[0]]
    assert f"train_loss {history['train_loss'][1]:.4f}" in lines[1] and f"val_loss {history['val_loss'][1]:.4f}" in lines[1]
    assert lines[-1].startswith("run ended after ") and "step 4, 2 epoch(s)" in lines[-1]
    assert "checkpoints in" not in lines[-1]


def test_log_epochs_false_is_silent_and_a_logging_callback_replaces_the_default(lines):
    train, val = _loaders()
    _trainer(log_epochs=False).fit(train, num_epochs=2, val_loader=val)
    assert lines == []
    _trainer([LoggingCallback(log_interval=100)]).fit(train, num_epochs=2, val_loader=val)
    assert [line.split(" | ")[0] for line in lines].count("epoch 0") == 1  # not twice
    assert sum(line.startswith("run ended after") for line in lines) == 1


def test_step_mode_evaluations_get_a_line_each(lines):
    train, val = _loaders()
    _trainer().fit(train, max_steps=4, val_loader=val, eval_every_n_steps=2)
    assert [line.split(" | ")[0] for line in lines if line.startswith("evaluate")] == [
        "evaluate at step 2", "evaluate at step 4"]


# ------------------------------------------------------------------ the closing line: last and true
def test_the_closing_line_names_a_checkpoint_folder_only_once_something_is_in_it(lines, tmp_path):
    train, _ = _loaders()
    _trainer(checkpoint_dir=tmp_path / "none").fit(train, num_epochs=1)  # nothing saved
    assert lines[-1].startswith("run ended after") and "checkpoints in" not in lines[-1]
    _trainer([ModelCheckpoint(every_n_epochs=1)], checkpoint_dir=tmp_path / "some").fit(train, num_epochs=1)
    assert lines[-1].endswith(f"checkpoints in {tmp_path / 'some'} (latest step-000000002.ckpt)")


class SignalAt(Callback):
    def on_batch_end(self, batch_idx, trainer, logs=None):
        if trainer.global_step == 3 and logs["ends_window"]:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_a_preempted_runs_closing_line_comes_after_the_save_and_names_it(lines, tmp_path):
    train, _ = _loaders()
    trainer = _trainer([LoggingCallback(log_interval=100), SignalAt()], handle_signals=True,
                       checkpoint_dir=tmp_path, stop_check_period=0)
    with pytest.raises(SystemExit) as stopped:
        trainer.fit(train, num_epochs=5)
    assert stopped.value.code == 75
    saved = next(i for i, line in enumerate(lines) if line.startswith("saved "))
    assert lines[-1].startswith("run ended after") and saved < len(lines) - 1
    assert "step 3" in lines[-1] and f"checkpoints in {tmp_path} (latest step-000000003.ckpt)" in lines[-1]


def test_one_best_per_run_early_stopping_and_the_closing_line_agree(lines, tmp_path):
    """With min_delta, 2.95 and 2.9 do not restart the count, but 2.9 is the run's best value."""
    train, val = _loaders()
    early = EarlyStopping("val_score", patience=3, min_delta=0.2)
    trainer = _trainer([early, ModelCheckpoint(monitor="val_score", every_n_epochs=None)], checkpoint_dir=tmp_path,
                       metrics={"score": Scripted([3.0, 2.95, 2.9, 2.99, 5.0, 5.0])})
    trainer.fit(train, num_epochs=6, val_loader=val)
    assert (early.best, early.best_step, early.stopped_step) == (2.9, 6, 8)  # stopped after the fourth epoch
    stop_line = next(line for line in lines if line.startswith("EarlyStopping:"))
    assert "(best 2.9 at step 6)" in stop_line
    assert lines[-1].count("best ") == 1 and f"best val_score 2.9000 at step 6 ({tmp_path / 'best.ckpt'})" in lines[-1]


def test_early_stopping_alone_gives_the_closing_lines_best(lines):
    train, val = _loaders()
    _trainer([EarlyStopping("val_score", patience=5)], metrics={"score": Scripted([3.0, 2.0, 2.5])}).fit(
        train, num_epochs=3, val_loader=val)
    assert lines[-1].endswith("| best val_score 2.0000 at step 4")


# ------------------------------------------------------------------ did you mean
def test_misspelt_keywords_of_fit_evaluate_and_callbacks_get_the_closest_name():
    trainer = _trainer()
    with pytest.raises(TypeError, match=r"Trainer.fit\(\) got unknown option\(s\) 'num_epoch' \(did you mean 'num_epochs'\?\)"):
        trainer.fit([], num_epoch=1)
    with pytest.raises(TypeError, match=r"EarlyStopping got unknown option\(s\) 'patiense' \(did you mean 'patience'\?\)"):
        EarlyStopping(patiense=2)
    with pytest.raises(TypeError, match=r"ModelCheckpoint got unknown option\(s\) 'every_n_step' \(did you mean 'every_n_steps'\?\)"):
        ModelCheckpoint("runs/x", every_n_step=5)
    with pytest.raises(TypeError, match=r"LoggingCallback got unknown option\(s\) 'log_intervall' \(did you mean 'log_interval'\?\)"):
        LoggingCallback(log_intervall=5)

    class Mine(Callback):
        def __init__(self, threshold: float = 0.5) -> None:
            self.threshold = threshold

    with pytest.raises(TypeError, match=r"Mine got unknown option\(s\) 'treshold' \(did you mean 'threshold'\?\)"):
        Mine(treshold=0.2)
    assert Mine(threshold=0.2).threshold == 0.2


# ------------------------------------------------------------------ a missing optional package: one line
@pytest.mark.parametrize("callback, package, extra", ((lambda: MLflowCallback(), "mlflow-skinny", "mlflow"),
                                                      (lambda: WandbCallback("p"), "wandb", "wandb")))
def test_a_tracker_without_its_package_is_one_line(monkeypatch, callback, package, extra):
    monkeypatch.setitem(sys.modules, "mlflow" if extra == "mlflow" else "wandb", None)
    with pytest.raises(MissingDependencyError) as missing:
        callback()
    name = "MLflowCallback" if extra == "mlflow" else "WandbCallback"
    assert str(missing.value) == f"{name} needs {package}, which is not installed: pip install 'anndist[{extra}]'"


def test_the_gpt2_example_without_transformers_has_help_and_one_line(monkeypatch, capsys):
    from train_gpt2 import main
    monkeypatch.setitem(sys.modules, "transformers", None)
    try:  # torch's @record turns argparse's exit 0 into a return
        main(["--help"])
    except SystemExit as helped:
        assert helped.code == 0
    assert "--accumulation" in capsys.readouterr().out
    with pytest.raises(SystemExit) as failed:
        main(["--max-steps", "1"])
    assert failed.value.code == 1
    assert capsys.readouterr().err == ("error: launch/train_gpt2.py needs transformers, which is not installed: "
                                       "pip install 'anndist[hf]'\n")


# ------------------------------------------------------------------ the sampler mistake
def test_a_distributed_sampler_built_before_the_trainer_gets_what_to_do(capsys):
    from torch.utils.data import DistributedSampler
    try:
        DistributedSampler(range(8))  # no process group in this process
    except ValueError as exc:
        error = exc
    assert sampler_hint.explains(error)
    # Importing anndist installed it (torch's init_process_group, run by other tests in this process,
    # wraps whatever hook it finds, so the hook is found by what it prints, not by name).
    sys.excepthook(type(error), error, error.__traceback__)
    err = capsys.readouterr().err
    assert "Default process group has not been initialized" in err
    assert err.rstrip().endswith(sampler_hint.HINT) and "DataLoader(dataset, batch_size=..., shuffle=True)" in err
    other = ValueError("Default process group has not been initialized")  # not from the sampler: as it is
    assert not sampler_hint.explains(other)
    sys.excepthook(ValueError, other, None)
    assert sampler_hint.HINT not in capsys.readouterr().err


# ------------------------------------------------------------------ the profile table with tracing on
def test_the_profile_table_counts_every_step_and_says_which_were_traced(lines, tmp_path):
    train, _ = _loaders(64)  # 8 steps
    profiler = ProfilingCallback(trace_dir=tmp_path, trace_steps=(2, 4))
    _trainer([profiler]).fit(train, num_epochs=1)
    assert profiler.table.startswith("profile: 8 optimizer steps per rank, 6 timed (2 traced by torch.profiler left out)")
    assert (tmp_path / "rank0.json").exists()


# ------------------------------------------------------------------ the README's long-run example
def test_model_checkpoint_keeps_the_best_of_step_mode_evaluations(lines, tmp_path):
    """fit(eval_every_n_steps=N) with ModelCheckpoint(monitor=...): judged at each step evaluation (the
    epoch's end carries no val metrics then; it raised that the monitor was missing)."""
    train, val = _loaders(32)  # 4 steps per epoch
    checkpoint = ModelCheckpoint(every_n_steps=2, keep_last=2, monitor="val_score")
    trainer = _trainer([checkpoint], checkpoint_dir=tmp_path, metrics={"score": Scripted([3.0, 2.0, 2.5])})
    trainer.fit(train, max_steps=6, val_loader=val, eval_every_n_steps=2)
    assert (checkpoint.best_score, checkpoint.best_step) == (2.0, 4)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best.ckpt", "step-000000004.ckpt", "step-000000006.ckpt"]
    assert f"best val_score 2.0000 at step 4 ({tmp_path / 'best.ckpt'})" in lines[-1]
    fresh = _trainer()
    assert fresh.load_checkpoint(tmp_path / "best.ckpt")["best_score"] == 2.0 and fresh.global_step == 4
