"""The live straggler check: its rule (in process), and StragglerCallback on two real ranks (one spawn
running every scenario): a rank made slow is found from the measured step times, named with its host
after ``patience`` checks; with ``action="exit"`` every rank stops at the same step, saves and exits
75, and the run resumed from that checkpoint ends with exactly the weights of an uninterrupted run.
The Slurm requeue that leaves the slow node out is in test_stragglers_slurm.py."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from anndist import StragglerCallback, Trainer
from anndist.callbacks.straggler_rule import describe, find_stragglers
from support import make_dataset, make_model

SLOW_S = 0.02  # the slow rank's extra time per forward, far above this machine's noise per step


def test_a_rank_slower_than_the_others_and_costly_enough_is_a_straggler():
    (found,) = find_stragglers([1.0, 30.0], [31.0, 31.0], 0.75, 0.05)
    assert (found.rank, found.others_ms) == (1, 1.0) and found.cost == pytest.approx(29 / 31)
    assert describe(found, "node7").startswith("rank 1 on node7 spends 30.00 ms per step outside the gradient wait, "
                                               "30.0x the median of the other ranks (1.00 ms)")
    # against the median of the *others*: one slow rank among three, and two ranks
    assert [s.rank for s in find_stragglers([1.0, 1.0, 1.4], [2.0] * 3, 0.75, 0.05)] == [2]
    assert [s.rank for s in find_stragglers([1.0, 1.5], [2.0] * 2, 0.75, 0.05)] == [1]  # the plain median: 1.2x
    assert find_stragglers([1.0, 1.3], [2.0] * 2, 0.75, 0.05) == []  # 1.3x: within 1 / 0.75


def test_a_slow_rank_that_costs_the_job_little_is_left_alone():
    assert find_stragglers([1.0, 2.0], [100.0, 100.0], 0.75, 0.05) == []  # 2x, but 1% of the step
    assert [s.rank for s in find_stragglers([1.0, 2.0], [100.0, 100.0], 0.75, 0.01)] == [1]


def test_ranks_without_timed_steps_neither_lag_nor_hide_others():
    assert [s.rank for s in find_stragglers([math.nan, 1.0, 1.0, 9.0], [10.0] * 4, 0.75, 0.05)] == [3]
    assert find_stragglers([1.0], [2.0], 0.75, 0.05) == [] and find_stragglers([1.0, 5.0], [math.nan] * 2, 0.75, 0.05) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"every_n_steps": 0}, "every_n_steps=0"), ({"every_s": 0}, "every_s=0"), ({"patience": 0}, "patience=0"),
    ({"action": "kill"}, "action='kill' is not one of"), ({"threshold": 1.5}, "threshold=1.5 must be between 0 and 1"),
    ({"min_cost": 0}, "min_cost=0 must be between"), ({"every_n_steps": True}, "every_n_steps=True"),
])
def test_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StragglerCallback(**kwargs)


def test_exit_needs_a_checkpoint_dir():
    model = make_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                      callbacks=[StragglerCallback(action="exit")], progress_bar=False)
    with pytest.raises(Exception, match=r"action='exit'\) saves a checkpoint before it exits: pass checkpoint_dir"):
        trainer.fit(DataLoader(make_dataset(32), batch_size=8), num_epochs=1)


# ---------------------------------------------------------------- on two real ranks (one spawn)
