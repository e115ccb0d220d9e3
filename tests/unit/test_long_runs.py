"""Long runs in one process: loaders that cannot be read twice are errors, not NaN."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from anndist import Trainer
from support import make_dataset, make_model


def test_loaders_that_cannot_be_read_again_are_errors_not_nan():
    model = make_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), progress_bar=False)
    batches = [(x.unsqueeze(0), y.unsqueeze(0)) for x, y in make_dataset(8)]
    with pytest.raises(ValueError, match="train_loader is a one-shot iterator \\(generator\\).*num_epochs=2"):
        trainer.fit((b for b in batches), num_epochs=2)
    with pytest.raises(ValueError, match="the train loader yielded no batches in epoch 0 on any rank"):
        trainer.fit([], num_epochs=1)
    # max_steps over a one-shot generator that holds enough batches is fine; one that runs dry is an error
    trainer.fit((b for b in batches), max_steps=5)
    assert trainer.global_step == 5
    with pytest.raises(ValueError, match="yielded no batches in epoch 2 .*one-shot iterator"):
        trainer.fit((b for b in batches), max_steps=20)
    with pytest.raises(ValueError, match="fit\\(\\) needs num_epochs=... or max_steps="):
        trainer.fit(batches)
    with pytest.raises(ValueError, match="eval_every_n_steps=5 needs a val_loader"):
        trainer.fit(batches, max_steps=3, eval_every_n_steps=5)
