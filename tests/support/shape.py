"""The run of the global-batch and elastic tests (tests/unit, multiprocess and e2e ``test_global_batch.py``,
``e2e/test_elastic.py``): one fixed run with ``global_batch_size``, whose samples are numbered so that
every optimizer step's samples can be counted, on any number of ranks.

90 samples, batch 3, 12 samples per optimizer step: K = 4 on 1 rank, 2 on 2; 7 full steps and a last
one of 6 per epoch (2 pieces of 3: the same on 1 and 2 ranks). AdamW with a per-step LR schedule.
"""
from __future__ import annotations

import json
import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from anndist import Callback, Trainer
from anndist.dist import collectives

from .models import make_dataset, make_model

SAMPLES, BATCH, GLOBAL, SEED, EPOCHS = 90, 3, 12, 5, 2
STEPS_PER_EPOCH = 8


def numbered_dataset(n: int = SAMPLES) -> TensorDataset:
    """``make_dataset``'s samples with their index as a third tensor."""
    x, y = make_dataset(n).tensors
    return TensorDataset(x, y, torch.arange(n))


def shape_loader(n: int = SAMPLES, batch: int = BATCH) -> DataLoader:
    return DataLoader(numbered_dataset(n), batch_size=batch, shuffle=True)


class StepSamples(Callback):
    """The sample numbers each optimizer step trained on this rank ({step: [ids]}), taken in the loss step;
    with ``path``, each step is also appended to that file as one JSON line (closed after each: a kill
    loses nothing written), and the run's start with its world size, pid and time."""

    def __init__(self, path: str | None = None) -> None:
        self.path, self.window, self.steps = path, [], {}

    def compute_loss(self, model, batch):
        x, y, ids = batch
        self.window += ids.tolist()
        return nn.functional.cross_entropy(model(x), y)

    def on_train_begin(self, trainer, logs=None):
        self.window = []
        self._write({"begin": trainer.global_step, "epoch": trainer.epoch, "world_size": trainer.world_size,
                     "rank": trainer.rank, "master_port": os.environ.get("MASTER_PORT")})  # one per rendezvous

    def on_batch_end(self, batch_idx, trainer, logs=None):
        if not logs["ends_window"]:
            return
        if logs["stepped"]:
            self.steps[trainer.global_step] = sorted(self.window)
            self._write({"step": trainer.global_step, "epoch": trainer.epoch, "ids": sorted(self.window)})
        self.window = []

    def _write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as log:
                log.write(json.dumps({**record, "pid": os.getpid(), "time": time.time()}) + "\n")

    def global_steps(self) -> dict[int, list[int]]:
        """Every rank's samples of each step, joined (a collective: call it on every rank)."""
        joined: dict[int, list[int]] = {}
        for steps in collectives.all_gather_object(self.steps):
            for step, ids in steps.items():
                joined.setdefault(step, []).extend(ids)
        return {step: sorted(ids) for step, ids in joined.items()}


def shape_trainer(samples: StepSamples, callbacks=(), dropout: float = 0.3, **options) -> Trainer:
    model = make_model(dropout=dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.8)
    return Trainer(model, optimizer, callbacks=[samples, *callbacks], compute_loss=samples.compute_loss,
                   scheduler=scheduler, seed=SEED, progress_bar=False,
                   **{"global_batch_size": GLOBAL, "handle_signals": False, "stop_check_period": 0, **options})


class StopAfter(Callback):
    """Stops the run after optimizer step ``step`` (every rank agrees on it: stop_check_period=0 in one
    process stops there, on several ranks one step later)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_batch_end(self, batch_idx, trainer, logs=None):
        if logs["ends_window"] and trainer.global_step >= self.step:
            trainer.stop_training = True
