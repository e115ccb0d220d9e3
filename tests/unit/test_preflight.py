"""The pre-flight check: its rules on any job's records (in process), and the check itself on real ranks
(one spawn of two gloo ranks running every scenario). The real torchrun launches, a rank sharing its
core with a CPU hog among them, are in test_preflight_torchrun.py."""
from __future__ import annotations

import os

import pytest
import torch

from anndist import Trainer, run_preflight
from anndist.dist.host import host_name
from anndist.dist.lagging import versus_others
from anndist.preflight.__main__ import checkpoint_dir_in, parse_args, parse_size
from anndist.preflight.facts import rank_facts, stated_nodes
from anndist.preflight.measure import node_leaders
from anndist.preflight.table import format_report
from anndist.preflight.trainer_check import checkpoint_estimate
from anndist.preflight.verdict import compute, folder, judge, layout, slow_links, software
from support import make_model

GIB = 2**30


def record(rank: int, host: str = "n1", local: int | None = None, lws: int = 1, gflops: float = 100.0, **extra):
    """One rank's facts and figures, as run_preflight gathers them."""
    base = {"rank": rank, "world_size": extra.pop("world_size", 2), "host": host, "launcher": "torchrun",
            "local_rank": rank if local is None else local, "local_world_size": lws, "nodes_stated": {},
            "job_nodes": None, "python": "3.11.7", "torch": "2.13.0", "anndist": "0.1.0", "entry": "train.py",
            "entry_sha256": "abc", "threads": 1, "cpus": [0, 1], "device": "cpu", "device_id": None,
            "compute": {"gflops": [gflops] * 3, "cpu_share": [1.0] * 3}, "folder": None}
    base.update(extra)
    return base


def texts(problems) -> list[str]:
    return [f"{p.kind} {p.ranks} {p.text}" for p in problems]


# ---------------------------------------------------------------- the rules, in process
def test_a_slow_rank_is_measured_against_the_others_not_against_itself():
    # With two ranks the plain median is their mean: a rank at 0.7x the other would sit at 0.82x of it.
    assert versus_others([1.0, 0.7]) == pytest.approx([1 / 0.7, 0.7])
    records = [record(0, "a", 0, 1), record(1, "b", 0, 1, gflops=70.0)]
    problems = compute(records, 0.75)
    assert [(p.kind, p.ranks) for p in problems] == [("lag", [1])]
    assert "0.70x the median of the other ranks" in problems[0].text
    assert problems[0].where(records) == "rank(s) 1 on b"
    assert compute([record(0), record(1, gflops=80.0)], 0.75) == []
    assert compute([record(0, world_size=1)], 0.75) == []  # alone: nothing to compare with


def test_compute_lag_says_when_the_rank_did_not_have_its_core():
    shared = record(1, gflops=50.0, compute={"gflops": [50.0] * 3, "cpu_share": [0.5, 0.52, 0.48]})
    (problem,) = compute([record(0), shared], 0.75)
    assert "it had a CPU 50% of the time: another busy process shares its core(s)" in problem.text
    (problem,) = compute([record(0), record(1, gflops=50.0)], 0.75)  # throttled, but on its own core
    assert "shares its core" not in problem.text


def test_a_rank_slow_in_every_round_lags_although_the_machine_speeds_up_and_slows_down():
    rounds = [100.0, 40.0, 160.0]  # load that comes and goes hits all ranks in the same round
    healthy = {"gflops": rounds, "cpu_share": [1.0] * 3}
    slow = {"gflops": [v * 0.6 for v in rounds], "cpu_share": [1.0] * 3}
    records = [record(0, compute=healthy), record(1, compute=dict(healthy)), record(2, compute=slow)]
    assert [p.ranks for p in compute(records, 0.75)] == [[2]]


def test_software_that_differs_names_the_odd_ranks_and_hosts():
    records = [record(0, "a"), record(1, "a"), record(2, "b", torch="2.12.0"), record(3, "b", entry_sha256="def")]
    found = {p.text.split()[0]: p for p in software(records)}
    assert found["torch"].ranks == [2] and "torch is 2.12.0 where the other 3 rank(s) have 2.13.0" in found["torch"].text
    assert found["entry_sha256"].ranks == [3] and found["entry_sha256"].where(records) == "rank(s) 3 on b"
    assert software([record(0), record(1)]) == []


@pytest.mark.parametrize("records, expected", [
    # Lightning#20391: SLURM_NTASKS=3 on 2 nodes, so 2 tasks on one node and 1 on the other
    ([record(0, "a", 0, 2), record(1, "a", 1, 2), record(2, "b", 0, 1)], "world size 3 is not nodes x processes per node"),
    # two agents that think they are different nodes run on one (or two nodes share a name)
    ([record(0, "a", 0, 1, nodes_stated={"GROUP_WORLD_SIZE": 2}), record(1, "a", 0, 1)], "a runs 2 rank(s) with local ranks [0, 0]"),
    ([record(0, "a", 0, 1, nodes_stated={"GROUP_WORLD_SIZE": 2}), record(1, "a", 0, 1)], "GROUP_WORLD_SIZE=2 nodes, but the ranks run on 1 host(s)"),
    ([record(0, "a", 0, 1, job_nodes=3), record(1, "b", 0, 1)], "the Slurm job holds 3 nodes but ranks run on 2"),
    ([record(0, "a", 0, 2, device="cuda:0", device_id="GPU-1"), record(1, "a", 1, 2, device="cuda:0", device_id="GPU-1")],
     "ranks share a GPU on a (cuda:0)"),
    ([record(0, "a", 0, 2, threads=2), record(1, "a", 1, 2, threads=2)], "(4 in all) exceed the 2 core(s)"),
    ([record(0, "a", 0, 2, cpus=[0]), record(1, "a", 1, 2, cpus=[0])], "(2 in all) exceed the 1 core(s)"),
])
def test_inconsistent_layouts_are_failures(records, expected):
    problems = layout(records)
    assert any(expected in p.text and p.kind == "fail" for p in problems), texts(problems)


def test_a_consistent_layout_passes():
    two_nodes = [record(r, "ab"[r // 2], r % 2, 2, cpus=[r % 2], nodes_stated={"SLURM_STEP_NUM_NODES": 2},
                        job_nodes=2, device_id=f"GPU-{r % 2}") for r in range(4)]
    assert layout(two_nodes) == []


def test_links_are_compared_between_remote_nodes_only():
    records = [record(r, f"n{r // 2}", r % 2, 2) for r in range(8)]  # 4 nodes of 2
    links = {1: {"latency_us": 5.0, "mb_s": 20000.0},  # inside rank 0's node: another kind of link
             2: {"latency_us": 50.0, "mb_s": 3000.0}, 4: {"latency_us": 55.0, "mb_s": 2900.0},
             6: {"latency_us": 52.0, "mb_s": 900.0}}
    assert [(p.ranks, p.kind) for p in slow_links(records, links, 0.75)] == [([6], "lag")]
    links[6] = {"latency_us": 400.0, "mb_s": 3000.0}
    assert [p.ranks for p in slow_links(records, links, 0.75)] == [[6]]
    links[6] = {"latency_us": 50.0, "mb_s": 3000.0}
    assert slow_links(records, links, 0.75) == []


def test_checkpoint_folder_problems():
    probe = {"error": None, "write_mb_s": 300.0, "free_bytes": 10 * GIB, "shared": True}
    fine = [record(0, "a", folder=probe), record(1, "b", folder=dict(probe))]
    assert folder(fine, 5 * GIB) == [] and folder(fine, None) == []
    (short,) = folder(fine, 20 * GIB)
    assert short.ranks == [0, 1] and "has 10.00 GiB free, less than a checkpoint (20.00 GiB)" in short.text
    unseen = [record(0, "a", folder=probe), record(1, "b", folder={**probe, "shared": False})]
    (problem,) = folder(unseen, None)
    assert problem.ranks == [1] and "not one shared folder" in problem.text
    broken = [record(0, "a", folder={**probe, "error": "PermissionError: denied", "shared": False}),
              record(1, "b", folder={**probe, "error": "PermissionError: denied", "shared": False})]
    assert texts(folder(broken, None)) == ["fail [0, 1] checkpoint_dir cannot be written: PermissionError: denied"]


def test_the_table_names_every_rank_and_host_and_ends_with_the_verdict():
    records = [record(0, "node-a", 0, 1), record(1, "node-b", 0, 1, gflops=40.0)]
    links = {1: {"latency_us": 60.0, "mb_s": 1000.0}}
    problems = judge(records, links, 0.75, None)
    table = format_report(records, links, None, problems, 1.25).splitlines()
    assert table[0].startswith("anndist preflight: 2 rank(s) on 2 host(s) (torchrun)")
    row = next(line for line in table if line.split()[:2] == ["1", "node-b"])
    assert row.split()[5:7] == ["40.0", "0.40"] and row.endswith("LAG")
    assert next(line for line in table if line.split()[:2] == ["0", "node-a"]).endswith("ok")
    assert "LAG rank(s) 1 on node-b: compute 40.0 GFLOP/s is 0.40x" in "\n".join(table)
    assert table[-1] == "preflight: FAILED, 1 problem(s) (lagging: rank(s) 1 on host(s) node-b), in 1.2 s"


def test_node_leaders_are_each_other_nodes_first_rank_and_rank_0s_neighbour():
    assert node_leaders(["a", "a", "b", "b", "c"]) == [1, 2, 4]
    assert node_leaders(["a", "b"]) == [1] and node_leaders(["a"]) == []


# ---------------------------------------------------------------- facts and options
def test_host_is_the_override_then_slurms_node_name_then_the_hostname():
    assert host_name({"ANNDIST_HOST": "fake1", "SLURMD_NODENAME": "n7"}, "box") == "fake1"
    assert host_name({"SLURMD_NODENAME": "n7"}, "box") == "n7"
    assert host_name({"SLURMD_NODENAME": " "}, "box") == "box"


def test_stated_nodes_come_from_the_launcher_that_started_the_ranks():
    assert stated_nodes({"GROUP_WORLD_SIZE": "2"}, "torchrun") == {"GROUP_WORLD_SIZE": 2}
    assert stated_nodes({"SLURM_STEP_NUM_NODES": "3", "GROUP_WORLD_SIZE": "2"}, "slurm") == {"SLURM_STEP_NUM_NODES": 3}
    facts = rank_facts({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "ANNDIST_HOST": "x", "SLURM_JOB_NUM_NODES": "2"}, 1, 2, torch.device("cpu"), __file__)
    assert (facts["host"], facts["local_rank"], facts["local_world_size"], facts["job_nodes"]) == ("x", 1, 2, 2)
    assert facts["entry"] == "test_preflight.py" and len(facts["entry_sha256"]) == 16
    assert facts["cpus"] == sorted(os.sched_getaffinity(0)) and facts["device_id"] is None


def test_command_line():
    assert parse_size("20G") == 20 * GIB and parse_size("512MiB") == 512 * 2**20 and parse_size("1000") == 1000
    assert checkpoint_dir_in(["--epochs", "3", "--checkpoint-dir", "runs/c"]) == "runs/c"
    assert checkpoint_dir_in(["--checkpoint_dir=runs/d"]) == "runs/d" and checkpoint_dir_in(["--epochs", "3"]) is None
    args = parse_args(["--strict", "train.py", "--epochs", "2", "--checkpoint-dir", "ck"])
    assert (args.strict, args.entry, args.args, args.checkpoint_dir) == (True, "train.py", ["--epochs", "2", "--checkpoint-dir", "ck"], "ck")
    with pytest.raises(SystemExit):
        parse_args(["--threshold", "1.5"])
    with pytest.raises(SystemExit):
        parse_args(["--checkpoint-size", "lots"])


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_preflight_option_is_checked(value):
    model = make_model()
    with pytest.raises(ValueError, match="preflight=.* must be False .*True .*'strict'"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), preflight=value)


def test_checkpoint_estimate_counts_parameters_buffers_and_the_optimizer_state():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.BatchNorm1d(10))
    params = sum(p.numel() for p in model.parameters()) * 4
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    adam = torch.optim.Adam(model.parameters())
    assert checkpoint_estimate(model, adam) == params + buffers + 2 * params  # before the first step
    model(torch.randn(4, 10)).sum().backward()
    adam.step()
    state = sum(v.numel() * v.element_size() for s in adam.state.values() for v in s.values())
    assert checkpoint_estimate(model, adam) == params + buffers + state


def test_one_process_checks_itself(tmp_path):
    result = run_preflight(torch.device("cpu"), __file__, tmp_path / "ckpt", checkpoint_bytes=1, rounds=2, round_s=0.02)
    assert result.passed and result.summary.startswith("preflight: passed, 1 rank(s)")
    (mine,) = result.records
    assert mine["folder"]["shared"] and mine["folder"]["write_mb_s"] > 0 and mine["compute"]["gflops"][0] > 0
    assert not any(p.name.startswith(".anndist-preflight") for p in (tmp_path / "ckpt").iterdir())  # probes removed
    result = run_preflight(torch.device("cpu"), None, tmp_path / "ckpt", checkpoint_bytes=2**60, rounds=1, round_s=0.01)
    assert not result.passed and "less than a checkpoint" in result.report


# ---------------------------------------------------------------- on two real ranks (one spawn)
