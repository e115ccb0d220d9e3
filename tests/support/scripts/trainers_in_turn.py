"""Several Trainers in one process, one after another: a tuning loop, a fine-tune after pre-training.

    torchrun --standalone --nproc_per_node=2 tests/support/scripts/trainers_in_turn.py OUT_DIR
    python tests/support/scripts/trainers_in_turn.py OUT_DIR            # alone, or with torchrun's variables by hand

Two ``with Trainer(...)`` blocks (each closes its Trainer, and with it the process group it created),
then a Trainer left open and another one beside it (it uses the open one's group), then a last
``with`` block after ``close()``. Each trains its own model for an epoch; every rank writes
``OUT_DIR/rank{r}.json``: per Trainer the world size, the steps taken and a checksum of the weights
before and after, so the test can tell that each one trained, on every rank alike.
"""
import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # tests/, for support
from support import make_dataset, make_model  # noqa: E402

from anndist import Trainer  # noqa: E402


def train(trainer: Trainer, model: nn.Module) -> dict:
    before = sum(float(p.detach().double().sum()) for p in model.parameters())
    trainer.fit(DataLoader(make_dataset(64), batch_size=8, shuffle=True), num_epochs=1)
    after = sum(float(p.detach().double().sum()) for p in model.parameters())
    return {"world_size": trainer.world_size, "rank": trainer.rank, "steps": trainer.global_step,
            "before": before, "after": after, "created_group": trainer.created_process_group}


def new_trainer(seed: int) -> tuple[Trainer, nn.Module]:
    model = make_model(seed=seed)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), seed=seed,
                      progress_bar=False, log_epochs=False, dist_timeout=60)
    return trainer, model


def main(out: str) -> None:
    results = []
    for seed in (1, 2):  # two with-blocks in turn: each closes its Trainer and the group it made
        trainer, model = new_trainer(seed)
        with trainer:
            results.append(train(trainer, model))
    left_open, model = new_trainer(3)  # no with, no close()
    results.append(train(left_open, model))
    beside, model = new_trainer(4)  # the open Trainer's group, reused
    results.append(train(beside, model))
    beside.close()
    left_open.close()  # the last open Trainer on the group: it goes now
    trainer, model = new_trainer(5)
    with trainer:
        results.append(train(trainer, model))
    rank = results[0]["rank"]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
