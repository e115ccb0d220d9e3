"""Elastic torchrun, end to end: two agents on this machine, one worker each (two "nodes"), c10d rendezvous
with ``--nnodes=1:2``; node b is SIGKILLed mid-run, the survivor restarts on 1 rank and resumes from the
last committed checkpoint, node b's agent comes back and the job grows to 2 ranks again. The run
(tests/support/scripts/elastic_train.py: ``global_batch_size``, asynchronous checkpoints every 2 steps) is
then assembled from what every rank logged, step by step, and from the checkpoints the attempts resumed
from: no sample skipped, none trained twice, the same samples in the same steps as an uninterrupted run
in this process, and the same weights within 1e-6.

Every wait is on something the run announces (a file the gate writes once a checkpoint is committed,
an agent's exit), never a fixed delay; each has a limit with margin for a busy machine.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from support import ROOT, child_env, flat_params
from support.exit_trials import free_port
from support.shape import EPOCHS, SAMPLES, STEPS_PER_EPOCH, StepSamples, shape_loader, shape_trainer

SCRIPT = ROOT / "tests" / "support" / "scripts" / "elastic_train.py"
LIMIT_S = 270  # the whole job; the test's own pytest limit is 300 s
# Heartbeats every 2 s, a node dead after 5 missed (10 s: a busy machine delays heartbeats); a
# rendezvous that has its minimum closes 2 s later.
RDZV_CONF = "last_call_timeout=2,keep_alive_interval=2,keep_alive_max_attempt=5,join_timeout=240"


def _agent(node: str, port: int, tmp: Path) -> subprocess.Popen:
    # Node a hosts the rendezvous store (is_host), whichever agent starts faster; b connects to it.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1", "--max-restarts=3",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=anndist-elastic",
           f"--rdzv-conf={RDZV_CONF},is_host={int(node == 'a')}", "--local-addr=127.0.0.1", "--monitor-interval=0.2",
           str(SCRIPT), str(tmp / "ckpt"), str(tmp / "logs"), str(tmp / "final.pt")]
    # Workers of a restarted node must not share an agent's store across nodes (pytorch#135712).
    env = child_env(ELASTIC_NODE=node, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    log = open(tmp / f"agent-{node}-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(path: Path, agents: list[subprocess.Popen], deadline: float) -> None:
    """Until ``path`` exists; fail if every agent has ended or time is up."""
    while not path.exists():
        if all(agent.poll() is not None for agent in agents) or time.monotonic() > deadline:
            raise AssertionError(f"{path.name} never appeared; agents' exit codes {[a.poll() for a in agents]}")
        time.sleep(0.1)  # polling a file the run writes: the wait ends on the event, not on this delay


def _workers(logs: Path, node: str) -> list[int]:
    return [int(path.stem.split("-")[1]) for path in logs.glob(f"{node}-*.jsonl")]


def _kill_node(agent: subprocess.Popen, workers: list[int]) -> None:
    """SIGKILL of the agent's process group and of its workers (torchrun starts each in a session of its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(agent.pid, signal.SIGKILL)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    agent.wait(30)


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elastic")
    logs = tmp / "logs"
    logs.mkdir()
    port, deadline = free_port(), time.monotonic() + LIMIT_S
    agents = {"a": _agent("a", port, tmp), "b": _agent("b", port, tmp)}
    try:
        _wait_for(logs / "ready-kill", list(agents.values()), deadline)
        _kill_node(agents["b"], _workers(logs, "b"))
        (logs / "killed").touch()
        _wait_for(logs / "ready-rejoin", [agents["a"]], deadline)
        agents["b2"] = _agent("b", port, tmp)
        (logs / "rejoined").touch()
        codes = {name: agent.wait(max(1.0, deadline - time.monotonic())) for name, agent in agents.items()
                 if name != "b"}
    finally:
        for agent in agents.values():
            if agent.poll() is None:
                _kill_node(agent, [])
        for node in ("a", "b"):
            for pid in _workers(logs, node):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    agent_logs = "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(tmp.glob("agent-*.log")))
    assert codes == {"a": 0, "b2": 0}, agent_logs
    return {"logs": logs, "final": torch.load(tmp / "final.pt"), "agent_logs": agent_logs, "reference": _reference(),
            "kill_step": int((logs / "ready-kill").read_text()), "rejoin_step": int((logs / "ready-rejoin").read_text())}


def _attempts(logs: Path) -> list[dict]:
    """Every attempt (one start of the workers): its world size, the step it resumed from and each step's
    samples over its ranks, in the order the attempts ran."""
    attempts: dict[tuple, dict] = {}
    for path in logs.glob("*.jsonl"):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        begin = records[0]
        key = (begin["begin"], begin["world_size"], begin["master_port"])  # the ranks of one rendezvous
        attempt = attempts.setdefault(key, {"begin": begin["begin"], "world_size": begin["world_size"],
                                            "time": begin["time"], "ranks": 0, "steps": {}})
        attempt["ranks"] += 1
        for record in records[1:]:
            attempt["steps"].setdefault(record["step"], []).extend(record["ids"])
    return sorted(attempts.values(), key=lambda a: a["time"])


def _reference() -> tuple[torch.Tensor, dict[int, list[int]]]:
    samples = StepSamples()
    trainer = shape_trainer(samples)
    trainer.fit(shape_loader(), EPOCHS)
    return flat_params(trainer.module), samples.steps


def test_a_lost_and_a_rejoined_node_skip_and_repeat_no_sample(elastic):
    attempts = [a for a in _attempts(elastic["logs"]) if a["steps"] or a["begin"] < EPOCHS * STEPS_PER_EPOCH]
    sizes = [a["world_size"] for a in attempts]
    assert sizes[-3:] == [2, 1, 2], (sizes, elastic["agent_logs"])  # lost node b, then it came back
    assert all(a["ranks"] == a["world_size"] for a in attempts)
    # The run as it stands: each attempt's steps up to the checkpoint the next attempt resumed from.
    kept: dict[int, list[int]] = {}
    for attempt, following in zip(attempts, attempts[1:] + [None]):
        end = following["begin"] if following is not None else EPOCHS * STEPS_PER_EPOCH
        kept.update({step: sorted(ids) for step, ids in attempt["steps"].items() if attempt["begin"] < step <= end})
    _, reference = elastic["reference"]
    assert sorted(kept) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert kept == reference  # the same samples in the same optimizer steps as the uninterrupted run
    for epoch in range(EPOCHS):
        ids = [i for step in range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1) for i in kept[step]]
        assert sorted(ids) == list(range(SAMPLES))  # none skipped, none twice
    # What the loss of a node cost: the step after the last committed checkpoint, trained on 2 ranks and
    # then again on 1 (counted once above); the grow back stopped at a checkpoint of its own: nothing redone.
    lost, shrunk, grown = attempts[-3:]
    assert elastic["kill_step"] in lost["steps"] and shrunk["begin"] == elastic["kill_step"] - 1
    assert grown["begin"] == elastic["rejoin_step"] and max(shrunk["steps"]) == elastic["rejoin_step"]


def test_the_elastic_run_ends_with_the_uninterrupted_weights(elastic):
    params, _ = elastic["reference"]
    final = elastic["final"]
    assert (final["global_step"], final["world_size"]) == (EPOCHS * STEPS_PER_EPOCH, 2)
    assert (final["params"] - params).abs().max() <= 1e-6
