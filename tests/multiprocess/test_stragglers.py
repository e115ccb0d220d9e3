"""The live straggler check on 2 ranks: the slow rank named with its host, on every rank alike; exit saves and resumes exactly."""
from __future__ import annotations

import os
import time

import pytest
import torch
from torch.utils.data import DataLoader

from anndist import StragglerCallback, Trainer, latest_checkpoint
from anndist.checkpoint.file import read_checkpoint
from support import flat_params, make_dataset, make_model, run_spawn

SLOW_S = 0.02  # the slow rank's extra time per forward, far above this machine's noise per step


def _trainer(rank: int, callbacks, slow: bool, **options) -> Trainer:
    model = make_model(seed=0)
    if slow:
        model.register_forward_pre_hook(lambda module, inputs: time.sleep(SLOW_S))
    return Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), torch.nn.CrossEntropyLoss(), seed=1,
                   callbacks=callbacks, progress_bar=False, **options)


def _scenarios(rank: int, world_size: int, folder: str) -> dict:
    os.environ["ANNDIST_HOST"] = f"node{rank}"
    loader = DataLoader(make_dataset(256), batch_size=8, shuffle=True)  # 16 optimizer steps per epoch per rank
    out = {}
    strict = {"threshold": 0.2, "min_cost": 0.5}  # healthy ranks on a busy machine must not lag
    warn = StragglerCallback(every_n_steps=4, patience=2, **strict)
    _trainer(rank, [warn], slow=rank == 1).fit(loader, num_epochs=1)
    out["warn"] = [(step, host, s.rank) for step, host, s in warn.found]
    out["checks"] = warn.checks
    healthy = StragglerCallback(every_s=0.02, patience=2, **strict)  # by time: the step count agreed in the check
    reference = _trainer(rank, [healthy], slow=False)
    reference.fit(loader, num_epochs=2)
    out["healthy"], out["timed"], out["reference"] = healthy.found, healthy.checks, flat_params(reference.module)
    leave = StragglerCallback(every_n_steps=4, patience=2, action="exit", **strict)
    stopped = _trainer(rank, [leave], slow=rank == 1, checkpoint_dir=folder, auto_resume=True)
    try:
        stopped.fit(loader, num_epochs=2)
        out["exit"] = None
    except SystemExit as exc:
        out["exit"] = (exc.code, stopped.global_step, leave.decision)
    resumed = _trainer(rank, [], slow=False, checkpoint_dir=folder, auto_resume=True)
    resumed.fit(loader, num_epochs=2)
    out["resumed"] = flat_params(resumed.module)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stragglers") / "ckpt"
    return folder, run_spawn(_scenarios, 2, str(folder), timeout=240)


def test_the_slow_rank_is_named_with_its_host_after_patience_checks_on_every_rank(two_ranks):
    _, results = two_ranks
    found = [r["warn"] for r in results]
    assert found[0] == found[1], found  # one verdict, reduced across ranks
    assert found[0] and {(host, rank) for _, host, rank in found[0]} == {("node1", 1)}, found
    checks = results[0]["checks"]
    assert [step for step, _ in checks] == [4, 8, 12, 16] and checks == results[1]["checks"]
    # patience=2: named at the second check in a row that found it lagging, not at the first
    first = next(i for i, (_, ranks) in enumerate(checks) if i and ranks == [1] and checks[i - 1][1] == [1])
    assert found[0][0][0] == checks[first][0], (found, checks)


def test_healthy_ranks_are_left_alone(two_ranks):
    _, results = two_ranks
    assert [r["healthy"] for r in results] == [[], []]


def test_checks_by_time_happen_at_the_same_steps_on_every_rank(two_ranks):
    _, results = two_ranks
    steps = [[step for step, _ in r["timed"]] for r in results]
    assert steps[0] == steps[1], steps  # else the ranks' all-reduces would not match
    assert steps[0][0] == 10 and len(steps[0]) >= 2, steps  # the first check learns the pace, then every ~0.02 s


def test_exit_stops_every_rank_at_one_step_saves_and_resumes_exactly(two_ranks):
    folder, results = two_ranks
    exits = [r["exit"] for r in results]
    assert exits[0] is not None and exits[0] == exits[1], exits  # same code, same step, same decision
    code, step, decision = exits[0]
    assert code == 75 and 8 <= step < 32 and decision["hosts"] == ["node1"] and decision["ranks"] == [1]
    saved = read_checkpoint(latest_checkpoint(folder))
    assert saved["states"]["train_state"]["global_step"] == step
    assert saved["metadata"] == {"reason": "straggler", "hosts": "node1"}
    for result in results:
        assert torch.equal(result["resumed"], result["reference"])  # bit for bit, as if never stopped
