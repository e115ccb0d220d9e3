"""Every example in launch/ under real torchrun on 2 ranks, each cut short with --max-steps.

One torchrun launch per example (the machine is shared: few process starts) with a generous time
limit per launch, 180 s (240 s for the one with a restart), against 11-32 s measured on the 2-core
VM at load average 4 and 23-53 s at load average 6-8.
"""
import os
import re
import sys
from pathlib import Path

from support import ROOT, child_env, run, torchrun

LAUNCH = ROOT / "launch"
LIMIT_S = 180
TRAIN_SAMPLES = 1437  # digits_data: 1797 images, 20% held out for validation
# 2 ranks: the distributed sampler pads the 1437 samples to 2 x 719, so each rank takes the same steps
SAMPLES_PER_EPOCH_2_RANKS = 2 * -(-TRAIN_SAMPLES // 2)
STEPS_PER_EPOCH_BATCH_32 = -(-(SAMPLES_PER_EPOCH_2_RANKS // 2) // 32)  # 719 per rank in batches of 32: 23


def _end(output: str) -> tuple[int, int]:
    """(optimizer step, complete epochs) of the closing line; exactly one closing line per run."""
    ends = re.findall(r"^run ended after [\d.ms ]+: step (\d+)(?: \(.*?\))?, (\d+) epoch\(s\)", output, re.M)
    assert len(ends) == 1, output[-3000:]
    return int(ends[0][0]), int(ends[0][1])


def _epoch_lines(output: str) -> list[str]:
    return re.findall(r"^epoch (\d+) \| train_loss", output, re.M)


def test_digits_example_through_torchrun_sh_stops_at_max_steps():
    # batch 64 per rank: 12 steps per epoch (23 with the default 32), so an epoch line at step 12 proves
    # the arguments reached the script; max_steps ends the run at step 15, inside epoch 1, which it closes.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # its python and torchrun
    proc = run(["bash", LAUNCH / "torchrun.sh", "--epochs", "3", "--batch-size", "64", "--max-steps", "15"],
               timeout=LIMIT_S, env=child_env(PATH=path))
    assert "training on 2 process(es)" in proc.stderr
    assert _epoch_lines(proc.stderr) == ["0", "1"]
    assert _end(proc.stderr) == (15, 2)


def test_cnn_example_with_amp_accumulation_and_profiling():
    proc = torchrun(LAUNCH / "train_cnn.py", "--max-steps", "5", "--accumulation", "2", "--precision", "bf16",
                    timeout=LIMIT_S)
    output = proc.stdout + proc.stderr
    assert "training on 2 process(es)" in output
    assert re.search(r"^profile: 5 optimizer steps per rank", output, re.M), output[-3000:]
    assert {int(r) for r in re.findall(r"^\s+(\d)\s+\S+\s+[\d.]+\s+[\d.]+", output, re.M)} == {0, 1}  # a row per rank
    assert _end(output) == (5, 1)  # max_steps closes the epoch it lands in


def test_custom_callbacks_example_early_stop_collective_and_best_checkpoint(tmp_path):
    # min_delta 10: no epoch after the first counts as an improvement, so patience 1 stops after epoch 1.
    proc = torchrun(LAUNCH / "custom_callbacks.py", "--checkpoint-dir", str(tmp_path), "--patience", "1",
                    "--min-delta", "10", "--max-steps", "100", timeout=LIMIT_S)
    output = proc.stdout + proc.stderr
    assert re.search(r"^early stop after epoch 1: val_loss has not improved", output, re.M), output[-3000:]
    totals = re.findall(r"^epoch (\d+): (\d+) training samples read by 2 rank\(s\) \(rank 0 read (\d+)\)", output, re.M)
    assert totals == [(str(e), str(SAMPLES_PER_EPOCH_2_RANKS), str(SAMPLES_PER_EPOCH_2_RANKS // 2)) for e in (0, 1)]
    assert _end(output) == (2 * STEPS_PER_EPOCH_BATCH_32, 2)  # stopped at the epoch end, not by --max-steps
    best = re.search(r"best val_loss ([\d.]+) at step (\d+) \((.*?)\)", output)
    assert best and best.group(3) == str(tmp_path / "best.ckpt") and (tmp_path / "best.ckpt").is_file()


def test_checkpoint_resume_example_preempted_then_resumed_by_a_torchrun_restart(tmp_path):
    # One launch, two generations of workers: SIGUSR1 after step 10 (rank 0 only) -> both ranks stop
    # at the same step, save, exit 75 -> torchrun restarts them -> auto_resume continues to --max-steps.
    proc = torchrun(LAUNCH / "checkpoint_resume.py", "--checkpoint-dir", str(tmp_path), "--max-steps", "40",
                    "--preempt-at-step", "10", "--save-every", "15", torchrun_args=("--max-restarts=1",),
                    timeout=LIMIT_S + 60)
    output = proc.stdout + proc.stderr
    stopped = re.search(r"^SIGUSR1 received: every rank stopped after optimizer step (\d+)", output, re.M)
    # The stop is agreed within stop_check_period (0.25 s) of the signal, at an agreed step >= 10.
    assert stopped and 10 <= int(stopped.group(1)) < 40, output[-3000:]
    step = int(stopped.group(1))
    assert f"saved {tmp_path / f'step-{step:09d}.ckpt'}" in output
    assert re.search(rf"^training on 2 process\(es\) from epoch {step // 23}, step {step}$", output, re.M)
    assert _end(output.split("resumed from")[-1]) == (40, 2)  # 23 steps per epoch: max_steps closes epoch 1
    kept = sorted({15, 30, step})[-2:]  # keep_last=2 of the periodic saves and the preemption's
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == [f"step-{n:09d}.ckpt" for n in kept]
    starts = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"kind": "start"' in line]
    assert len(starts) == 2  # the metrics file continues across the resume


def test_missing_optional_package_is_one_line_under_torchrun(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()  # an importable "tensorboard" that fails as a missing package does
    (blocked / "tensorboard.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'tensorboard'\", name='tensorboard')\n")
    proc = torchrun(LAUNCH / "train_digits.py", "--tensorboard", "--log-dir", str(tmp_path / "run"), check=False,
                    timeout=LIMIT_S, env=child_env(PYTHONPATH=f"{blocked}:{ROOT}"))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    lines = [line for line in output.splitlines() if "needs tensorboard" in line]
    assert lines == ["error: TensorBoardCallback needs tensorboard, which is not installed: "
                     "pip install 'anndist[tensorboard]' (or 'anndist[examples]' for everything the digits examples use)"]
    # Nothing of the workers' own tracebacks: what follows the line is torchrun's failure summary.
    assert "MissingDependencyError" not in output and "train_digits.py\", line" not in output


def test_stream_example_plans_in_steps_evaluates_every_n_and_records_one_mlflow_run(tmp_path, monkeypatch):
    import pytest
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for the reading client here (MLflow 3 asks for it)
    pytest.importorskip("mlflow", reason="the 'mlflow' extra (mlflow-skinny) records the run")
    uri = f"file:{tmp_path / 'mlruns'}"
    proc = torchrun(LAUNCH / "train_stream.py", "--max-steps", "60", "--eval-every", "20", "--tracking-uri", uri,
                    timeout=LIMIT_S)
    output = proc.stdout + proc.stderr
    # 23 steps per pass of each rank's stream: the evaluations fall across epoch boundaries
    assert re.findall(r"^evaluate at step (\d+) \| val_loss", output, re.M) == ["20", "40", "60"], output[-3000:]
    assert _end(output) == (60, 3)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "digits-stream"]
    (run_,) = client.search_runs([experiment.experiment_id])  # one run for the job, not one per rank
    assert [m.step for m in client.get_metric_history(run_.info.run_id, "eval/val_loss")] == [20, 40, 60]
