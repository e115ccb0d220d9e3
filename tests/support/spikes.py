"""The runs of the loss-spike guard tests (tests/unit and tests/multiprocess ``test_spike_guard.py``): a
small run into which a spike is injected (one micro-batch's inputs times 1000, on one rank) at known
(epoch, micro-batch) positions, with the weights recorded around every optimizer step."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Callback, Trainer
from anndist.step.spike_guard import SpikeGuard

from .models import flat_params, make_dataset, make_model

SAMPLES, BATCH, SEED = 64, 4, 11


class Spiker(Callback):
    """Multiplies the inputs of the micro-batches at ``targets`` ((epoch, batch_idx, rank) triples) by 1000
    in the loss step (which returns ``(loss, num_items)`` with ``items``), and keeps ``(epoch, batch_idx, global_step, stepped, weights)`` at every window's end."""

    def __init__(self, targets=(), items: bool = False) -> None:
        self.targets, self.where, self.windows, self.items = set(map(tuple, targets)), None, [], items

    def compute_loss(self, model, batch):
        x, y = batch
        if self.where in self.targets:
            x = x * 1000.0
        loss = nn.functional.cross_entropy(model(x), y)
        return (loss, len(y)) if self.items else loss  # items mode: (loss, num_items)

    def on_batch_begin(self, batch_idx, trainer, logs=None):
        self.where = (trainer.epoch, batch_idx, trainer.rank)

    def on_train_begin(self, trainer, logs=None):
        self.windows.append((trainer.epoch, None, trainer.global_step, None, flat_params(trainer.module)))

    def on_batch_end(self, batch_idx, trainer, logs=None):
        if logs["ends_window"]:
            self.windows.append((trainer.epoch, batch_idx, trainer.global_step, logs["stepped"],
                                 flat_params(trainer.module)))


def spike_run(spiker: Spiker, guard: SpikeGuard | bool, callbacks=(), **options) -> Trainer:
    model = make_model(hidden=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.9)
    return Trainer(model, optimizer, callbacks=[spiker, *callbacks], compute_loss=spiker.compute_loss,
                   spike_guard=guard, scheduler=scheduler, seed=SEED, progress_bar=False, handle_signals=False,
                   stop_check_period=0, **options)


def spike_loader() -> DataLoader:
    return DataLoader(make_dataset(SAMPLES), batch_size=BATCH, shuffle=True)
