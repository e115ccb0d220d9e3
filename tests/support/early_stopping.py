"""The run of the EarlyStopping tests (one process and 2 ranks): a Trainer whose ``val_score`` follows a
script, so the evaluation that spends the patience is known in advance."""
import torch
from torch import nn

from anndist import Trainer

from .models import make_model

# val_score per evaluation: best 3.0 at the third (epoch 2), then three evaluations that do not beat it
SCORES = [5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 2.0, 1.0, 0.5, 0.1]
STEPS_PER_EPOCH = 2  # 16 samples, batch 8 (per rank on 2 ranks: 32 samples)


class Scripted:
    """A metric (update/compute/reset) whose compute() returns the next value of a script."""

    def __init__(self, values, start=0):
        self.values, self.calls = list(values), start

    def reset(self):
        pass

    def update(self, preds, targets):
        pass

    def compute(self):
        self.calls += 1
        return self.values[self.calls - 1]


def scripted_trainer(early, start=0, extra=(), seed=0, **options):
    model = make_model(seed=seed)
    callbacks = [early, *extra]
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), callbacks=callbacks,
                   metrics={"score": Scripted(SCORES, start)}, progress_bar=False, handle_signals=False, seed=0,
                   **options)
