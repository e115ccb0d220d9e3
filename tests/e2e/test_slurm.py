"""End to end on a real Slurm cluster (started by the tests): the ``slurm/`` scripts train the digits
example on CPU, two ranks each, and must all reach the very same weights; a preempted run saves,
requeues, resumes and still reaches them; a SIGTERM as at a time limit leaves a complete checkpoint.

Needs root and Debian's Slurm packages (``.ci/run`` installs them); elsewhere these tests skip,
unless ANNDIST_REQUIRE_SLURM=1 (CI) turns the skip into a failure.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from anndist import latest_checkpoint
from anndist.checkpoint.file import read_checkpoint
from anndist.dist.slurm import RequeueError, requeue
from support import ROOT, child_env
from support.slurm_cluster import SlurmCluster, require_slurm

pytestmark = pytest.mark.slurm

SLURM = ROOT / "slurm"
EPOCHS = 40  # ~0.07 s each (batched reads): a signal sent after epoch 0 has ~3 s to land; short enough for CI
TRAIN = ("launch/train_digits.py", "--epochs", str(EPOCHS))


@pytest.fixture(scope="session")
def cluster():
    require_slurm()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... under pytest-xdist
    index = int(worker[2:]) + 1 if worker.startswith("gw") else 0
    slurm = SlurmCluster(first_job_id=1000 * index + 1).start()
    yield slurm
    slurm.stop()


def submit(cluster: SlurmCluster, script: str, folder: Path, *args: str, options: tuple[str, ...] = ()):
    """Submit ``slurm/<script>`` training the digits example; final weights go to folder/weights.pt."""
    env = child_env(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return cluster.submit(SLURM / script, *TRAIN, "--save", str(folder / "weights.pt"), *args,
                          output=folder / "job.out", options=options, env=env, cwd=ROOT)


def finished(job, folder: Path, timeout: float = 240.0) -> dict:
    status = job.wait(timeout)
    return {"status": status, "log": job.log, "weights": str(folder / "weights.pt")}


def shared(tmp_path_factory, name: str, compute) -> dict:
    """``compute(folder)`` once per test session, even across pytest-xdist workers (file lock)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' common base folder
    folder, done = root / name, root / name / "result.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            folder.mkdir(exist_ok=True)
            done.write_text(json.dumps(compute(folder)))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def reference(cluster, tmp_path_factory) -> dict:
    """Case 1, the uninterrupted run every other case must reproduce bit for bit."""
    return shared(tmp_path_factory, "slurm-single-node",
                  lambda folder: finished(submit(cluster, "single_node.sbatch", folder), folder))


def assert_same_weights(result: dict, reference: dict) -> None:
    ours = torch.load(result["weights"], weights_only=True)
    theirs = torch.load(reference["weights"], weights_only=True)
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"weights differ from the uninterrupted run in {different}\n{result['log']}"


def final_accuracy(log: str) -> float:
    last = [line for line in log.splitlines() if line.startswith(f"epoch {EPOCHS - 1} |")]
    assert len(last) == 1, log
    return float(last[0].split("val_accuracy")[1].split("|")[0])


def test_single_node_torchrun_inside_the_job(reference):
    """Case 1: slurm/single_node.sbatch runs torchrun in the batch job, one process per CPU of the job."""
    log = reference["log"]
    assert reference["status"] == 0, log
    assert "2 process(es)" in log and "training on 2 process(es) from epoch 0, step 0" in log
    assert final_accuracy(log) > 0.9, log
    assert Path(reference["weights"]).exists()


def test_srun_tasks_without_torchrun(cluster, reference, tmp_path):
    """Case 2: slurm/srun_tasks.sbatch, one srun task per rank; anndist reads the SLURM variables itself."""
    result = finished(submit(cluster, "srun_tasks.sbatch", tmp_path), tmp_path)
    assert result["status"] == 0, result["log"]
    assert "2 rank(s)" in result["log"] and "training on 2 process(es)" in result["log"]
    assert_same_weights(result, reference)


def test_two_nodes_one_torchrun_per_node(cluster, reference, tmp_path):
    """Case 3: slurm/multi_node.sbatch on two nodes, one torchrun each, c10d rendezvous on the first."""
    result = finished(submit(cluster, "multi_node.sbatch", tmp_path, options=("--cpus-per-task=1",)), tmp_path)
    log = result["log"]
    assert result["status"] == 0, log
    assert "on anndist-node[1-2], rendezvous anndist-node1:" in log and "training on 2 process(es)" in log
    assert_same_weights(result, reference)


def test_requeue_refused_names_the_reason(cluster, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    monkeypatch.setenv("PATH", cluster.env()["PATH"])
    with pytest.raises(RequeueError, match=r"`scontrol requeue 999999` failed: .*Invalid job id.*Resubmit it"):
        requeue("999999")


def test_preempted_job_saves_requeues_resumes_and_matches(cluster, reference, tmp_path):
    """Case 4: `scancel --signal=USR1` mid-training on two nodes (reaching the srun task on each, which
    passes it to its torchrun's workers): all ranks stop at the same step, save, requeue the job; the
    requeued run resumes and ends with exactly the uninterrupted run's weights. The first run's log
    ends with the save and the requeue, then one-line statements: no torchrun traceback."""
    ckpt = tmp_path / "ckpt"
    job = submit(cluster, "multi_node.sbatch", tmp_path, "--checkpoint-dir", str(ckpt),
                 options=("--cpus-per-task=1",))
    job.wait_for_log("epoch 0 |")
    job.scancel("--signal=USR1")
    result = finished(job, tmp_path)
    log = result["log"]
    assert result["status"] == 0, log
    first, _, second = log.partition(f"anndist: job {job.id} run 2 ")
    assert second, f"the job was not requeued:\n{log}"
    assert "SIGUSR1 received: every rank stopped after optimizer step" in first, log
    assert f"epoch {EPOCHS - 1} |" not in first, log
    assert_preempted_log_ends_quietly(first, job.id, nodes=("anndist-node1", "anndist-node2"))
    stopped_at = int(first.split("stopped after optimizer step ")[1].split()[0])
    assert f"optimizer step {stopped_at}" in second.split("resumed from", 1)[1].splitlines()[0], log
    assert f"training on 2 process(es) from epoch {stopped_at // 23}, step {stopped_at}" in second, log
    assert final_accuracy(second) > 0.9
    assert_same_weights(result, reference)


# What may follow the checkpoint's "saved ..." line in the run that a preemption ended (the requeue
# ends the job: Slurm TERMs every process, which lets them pass, and notes it), besides the lines the
# test requires. Each line is matched whole.
AFTER_SAVE = [
    r"slurmstepd-anndist-node\d: error: \*\*\* (JOB|STEP) [\d.]+ ON anndist-node\d CANCELLED AT \S+ DUE TO JOB REQUEUE \*\*\*",
    r"anndist: TERM \(time limit, scancel or requeue\): waiting for srun",
    r"srun: error: anndist-node\d: task \d+: Exited with exit code 75",
]


def assert_preempted_log_ends_quietly(run_log: str, job_id: str, nodes: tuple[str, ...]) -> None:
    """The save, the requeue, the run's closing line, one line per node from anndist.launcher, srun's
    exit status last; no traceback (before anndist.launcher, torchrun printed a ChildFailedError or a
    "death signal" SignalException traceback per node there, issue #13 item 8)."""
    assert "\nsaved " in run_log, run_log
    after = [line for line in run_log.split("\nsaved ", 1)[1].splitlines()[1:] if line.strip()]
    for noise in ("Traceback", "ChildFailedError", "death signal", "SignalException", "Rendezvous"):
        assert noise not in "\n".join(after), run_log
    required = [f"requeued SLURM job {job_id}: its next run resumes from the checkpoint",
                *(f"anndist: node {node}: workers preempted (exit 75), torchrun exits 75" for node in nodes)]
    assert all(line in after for line in required), run_log
    assert after[-1] == "anndist: srun exited with status 75", run_log
    # The run's closing line comes after the save and the requeue (the workers' last word), and names the checkpoint.
    closing = [i for i, line in enumerate(after) if line.startswith("run ended after ")]
    assert len(closing) == 1 and closing[0] > after.index(required[0]), run_log
    assert re.search(r"\| checkpoints in \S+ \(latest step-\d+\.ckpt\)$", after[closing[0]]), run_log
    unexpected = [line for i, line in enumerate(after[:-1])
                  if line not in required and i not in closing and not any(re.fullmatch(p, line) for p in AFTER_SAVE)]
    assert not unexpected, f"unexpected lines after the save: {unexpected}\n{run_log}"


def test_sigterm_as_at_a_time_limit_leaves_a_complete_checkpoint(cluster, tmp_path):
    """Case 5: TERM to every process of the job (`scancel --full --signal=TERM`, what a time limit sends
    before SIGKILL) with torchrun inside the job: the ranks stop together and save; no requeue."""
    ckpt = tmp_path / "ckpt"
    # Ten times the epochs (the last --epochs counts): the TERM ends the run anyway, and on a loaded
    # machine it may take longer than 40 epochs' ~3 s to land; nothing here is compared with the reference.
    job = submit(cluster, "single_node.sbatch", tmp_path, "--checkpoint-dir", str(ckpt), "--epochs", str(10 * EPOCHS))
    job.wait_for_log("epoch 0 |")
    job.scancel("--full", "--signal=TERM")
    result = finished(job, tmp_path)
    log = result["log"]
    assert result["status"] == 75, log  # the workers' exit status, passed on by anndist.launcher
    assert "SIGTERM received: every rank stopped after optimizer step" in log, log
    assert "requeued" not in log and " run 2 " not in log, log
    assert "Traceback" not in log and "death signal" not in log, log
    assert log.rstrip().endswith("anndist: torchrun exited with status 75"), log
    stopped_at = int(log.split("stopped after optimizer step ")[1].split()[0])
    path = latest_checkpoint(ckpt)
    assert path is not None, sorted(p.name for p in ckpt.iterdir())
    payload = read_checkpoint(path)  # a complete, readable anndist checkpoint (raises if torn)
    progress = payload["states"]["train_state"]
    assert progress["global_step"] == stopped_at and 0 < stopped_at < 10 * EPOCHS * 23
    assert progress["world_size"] == 2 and len(payload["ranks"]) == 2
    assert payload["metadata"] == {"reason": "preempted", "signal": "SIGTERM"}
    assert not Path(result["weights"]).exists()  # nothing after fit() ran
