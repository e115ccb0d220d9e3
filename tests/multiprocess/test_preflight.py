"""Pre-flight on 2 ranks: the figures are gathered to rank 0 only, every rank learns the verdict; Trainer(preflight=...)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from anndist import Trainer, run_preflight
from support import make_model, run_spawn

GIB = 2**30


def _scenarios(rank: int, world_size: int, root: str) -> dict:
    root_path = Path(root)
    torch_env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
                 "GROUP_WORLD_SIZE": "1", "ANNDIST_HOST": "box"}
    quick = {"rounds": 2, "round_s": 0.02, "threshold": 0.01}  # unpinned ranks on a busy machine: no lag verdicts
    out = {}
    healthy = run_preflight(torch.device("cpu"), __file__, root_path / "shared", **quick, environ=torch_env)
    out["healthy"] = (healthy.passed, healthy.summary, healthy.report, len(healthy.records))
    # Two nodes whose "same" checkpoint path is a different folder on each, and a different entry script.
    node_env = {"ANNDIST_HOST": f"node{rank}"}
    split = run_preflight(torch.device("cpu"), __file__ if rank == 0 else root_path / "other.py",
                          root_path / f"local{rank}", **quick, environ=node_env)
    out["split"] = (split.passed, split.summary, split.report)
    model = make_model()
    os.environ["ANNDIST_HOST"] = f"node{rank}"  # the Trainer reads the process's environment
    for mode in (True, "strict"):
        try:
            Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                    preflight=mode, checkpoint_dir=root_path / "a-file" / "ckpt", progress_bar=False)
            out[mode] = "built"
        except RuntimeError as exc:
            out[mode] = str(exc)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    (root / "other.py").write_text("print('another version of the script')\n")
    (root / "a-file").write_text("a file, where a folder should be\n")
    return run_spawn(_scenarios, 2, str(root), timeout=180)


def test_the_figures_are_gathered_to_rank_0_only_and_every_rank_learns_the_verdict(two_ranks):
    (passed0, summary0, report0, records0), (passed1, summary1, report1, records1) = (r["healthy"] for r in two_ranks)
    assert passed0 and passed1 and summary0 == summary1 and summary0.startswith("preflight: passed, 2 rank(s)")
    assert records0 == 2 and records1 == 0 and report1 == ""
    rows = [line.split() for line in report0.splitlines() if line.split()[:2] in (["0", "box"], ["1", "box"])]
    assert [row[2] for row in rows] == ["0/2", "1/2"] and all(row[-1] == "ok" for row in rows)
    assert "all-reduce over every rank: 4 B in" in report0


def test_another_script_and_an_unshared_folder_name_the_rank_and_node(two_ranks):
    (passed0, summary0, report0), (passed1, summary1, _) = (r["split"] for r in two_ranks)
    assert not passed0 and not passed1 and summary0 == summary1
    assert summary0.startswith("preflight: FAILED") and "failing: rank(s) 1 on host(s) node1" in summary0
    assert "FAIL rank(s) 1 on node1: entry_sha256 is" in report0
    assert "FAIL rank(s) 1 on node1: checkpoint_dir is not one shared folder" in report0


def test_trainer_preflight_warns_or_raises_on_every_rank(two_ranks):
    assert [r[True] for r in two_ranks] == ["built", "built"]
    strict = [r["strict"] for r in two_ranks]
    assert strict[0] == strict[1] and strict[0].startswith("preflight: FAILED")
    assert "failing: rank(s) 0, 1 on host(s) node0, node1" in strict[0] and "preflight=True to train anyway" in strict[0]
