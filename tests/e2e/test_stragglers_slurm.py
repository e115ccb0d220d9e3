"""End to end on a private Slurm cluster of THREE nodes: a two-node job with one slow node finds it while
training, checkpoints, requeues itself with that node excluded, and resumes on the other two with
exactly the weights of an uninterrupted run; the scripts' pre-flight check runs before each run, and
under ``PREFLIGHT=strict`` a failing check ends the job before training.

The slow node: tests/support/scripts/straggler_train.py sleeps before each forward on the host named by
SLOW_HOST; the StragglerCallback finds it from the step times it measures. Needs root and Slurm
(``.ci/run``); elsewhere these tests skip, unless ANNDIST_REQUIRE_SLURM=1 turns the skip into a failure.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch

from anndist import latest_checkpoint
from anndist.checkpoint.file import read_checkpoint
from support import ROOT, child_env, torchrun
from support.slurm_cluster import SlurmCluster, node_names, require_slurm, worker_first_job_id

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(450)]  # the job's two runs, then the reference

EPOCHS = "6"  # 23 optimizer steps each: the slow node is found at step 20, the run resumes for ~115 more
SLOW = "anndist-node2"


@pytest.fixture(scope="module")
def cluster():
    require_slurm()
    slurm = SlurmCluster(nodes=node_names(3), first_job_id=worker_first_job_id(offset=501)).start()
    yield slurm
    slurm.stop()


def job_env(**extra: str) -> dict[str, str]:
    return child_env(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]), **extra)


def table_hosts(run_log: str) -> list[str]:
    """The hosts of the pre-flight table's rows in ``run_log``, in rank order."""
    rows = [line.split() for line in run_log.splitlines() if re.match(r"\s+\d+ anndist-node\d ", line)]
    return [row[1] for row in sorted(rows, key=lambda row: int(row[0]))]


@pytest.fixture(scope="module")
def slow_node_job(cluster, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("slow-node")
    job = cluster.submit(ROOT / "slurm/multi_node.sbatch", "tests/support/scripts/straggler_train.py", "--epochs", EPOCHS,
                         "--checkpoint-dir", str(folder / "ckpt"), "--save", str(folder / "weights.pt"),
                         output=folder / "job.out", options=("--cpus-per-task=1",), cwd=ROOT,
                         env=job_env(SLOW_HOST=SLOW, PREFLIGHT="1"))
    status = job.wait(330)  # ends the job (scancel) if it runs past this
    # The uninterrupted reference, after the job (so that it does not share the cores with it).
    torchrun(ROOT / "launch/train_digits.py", "--epochs", EPOCHS, "--save", str(folder / "reference.pt"), timeout=100)
    return {"status": status, "log": job.log, "id": job.id, "folder": folder}


def test_the_slow_node_is_found_saved_around_and_left_out_of_the_requeue(slow_node_job):
    log, job = slow_node_job["log"], slow_node_job["id"]
    assert slow_node_job["status"] == 0, log
    first, _, second = log.partition(f"anndist: job {job} run 2 on ")
    assert first.startswith(f"anndist: job {job} run 1 on anndist-node[1-2],"), log
    found = re.search(r"straggler at optimizer step (\d+): rank 1 on anndist-node2 spends [\d.]+ ms per step", first)
    assert found, log
    stopped = re.search(r"straggler on anndist-node2: every rank stopped after optimizer step (\d+); saved (\S+)", first)
    assert stopped and int(found.group(1)) <= int(stopped.group(1)) < int(EPOCHS) * 23, log
    assert f"requeued SLURM job {job} without anndist-node2 (ExcNodeList=anndist-node2)" in first, log
    assert second.startswith("anndist-node[1,3],"), log  # the next run landed on the healthy nodes
    step = int(stopped.group(1))
    saved = read_checkpoint(Path(stopped.group(2)))
    assert saved["metadata"] == {"reason": "straggler", "hosts": SLOW}
    assert saved["states"]["train_state"]["global_step"] == step
    assert f"training on 2 process(es) from epoch {step // 23}, step {step}" in second, log
    assert "straggler at" not in second, log


def test_the_resumed_run_ends_with_the_uninterrupted_runs_weights(slow_node_job):
    folder = slow_node_job["folder"]
    ours = torch.load(folder / "weights.pt", weights_only=True)
    theirs = torch.load(folder / "reference.pt", weights_only=True)
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == [], slow_node_job["log"]
    assert latest_checkpoint(folder / "ckpt") is not None


def test_the_scripts_preflight_check_runs_before_each_run_on_that_runs_nodes(slow_node_job):
    log, job = slow_node_job["log"], slow_node_job["id"]
    first, _, second = log.partition(f"anndist: job {job} run 2 on ")
    for run_log, hosts in ((first, ["anndist-node1", "anndist-node2"]), (second, ["anndist-node1", "anndist-node3"])):
        head = run_log.split("training on 2 process(es)")[0]
        assert "anndist preflight: 2 rank(s) on 2 host(s) (torchrun)" in head, log
        assert table_hosts(head) == hosts, log
        assert re.search(r"^preflight: (passed|FAILED)", head, re.MULTILINE), log  # PREFLIGHT=1 trains either way


@pytest.fixture(scope="module")
def other_scripts(cluster, tmp_path_factory) -> dict:
    """Three short jobs side by side: single_node.sbatch under PREFLIGHT=strict with a checkpoint folder that
    cannot be made, srun_tasks.sbatch under PREFLIGHT=1 (check, then train one epoch), and a wrong PREFLIGHT."""
    folder = tmp_path_factory.mktemp("other-scripts")
    (folder / "a-file").write_text("a file, where a folder should be\n")
    jobs = {
        "strict": cluster.submit(ROOT / "slurm/single_node.sbatch", "launch/train_digits.py", "--epochs", "1",
                                 "--checkpoint-dir", str(folder / "a-file" / "ckpt"), output=folder / "strict.out",
                                 cwd=ROOT, env=job_env(PREFLIGHT="strict")),
        "checked": cluster.submit(ROOT / "slurm/srun_tasks.sbatch", "launch/train_digits.py", "--epochs", "1",
                                  "--checkpoint-dir", str(folder / "ckpt"), output=folder / "checked.out", cwd=ROOT,
                                  env=job_env(PREFLIGHT="1")),
        "wrong": cluster.submit(ROOT / "slurm/multi_node.sbatch", "launch/train_digits.py", output=folder / "wrong.out",
                                options=("--nodes=1",), cwd=ROOT, env=job_env(PREFLIGHT="yes")),  # the third node
    }
    return {name: (job.wait(240), job.log) for name, job in jobs.items()}


def test_a_strict_preflight_that_fails_ends_the_job_before_training(other_scripts):
    status, log = other_scripts["strict"]
    assert status == 1, log
    failure = re.search(r"^FAIL rank\(s\) 0, 1 on (anndist-node\d): checkpoint_dir cannot be written: ", log, re.MULTILINE)
    assert failure and table_hosts(log) == [failure.group(1)] * 2, log
    assert "anndist: pre-flight check failed (status 1): not training" in log, log
    assert "training on" not in log, log


def test_srun_tasks_check_then_train_on_the_same_rendezvous(other_scripts):
    status, log = other_scripts["checked"]
    assert status == 0, log
    head, _, training = log.partition("training on 2 process(es) from epoch 0, step 0")
    assert training and re.search(r"^preflight: (passed|FAILED)", head, re.MULTILINE), log
    assert "anndist preflight: 2 rank(s) on 1 host(s) (slurm)" in head and len(set(table_hosts(head))) == 1, log
    assert "epoch 0 | train_loss" in training, log


def test_a_wrong_preflight_value_is_refused(other_scripts):
    status, log = other_scripts["wrong"]
    assert status == 2 and "PREFLIGHT=yes: use 1 (check and train) or strict (train only if the check passes)" in log, log
