"""What the activation checkpointing tests share: a run that keeps the first window's gradients, compared."""
from __future__ import annotations

import torch
from torch import nn

from anndist import Callback, Trainer
from anndist.strategies.dtensor import local

from . import tp


class FirstGrads(Callback):
    """The local gradients at the end of the first window's backward, and the blocks' forwards until then."""

    def __init__(self) -> None:
        self.grads, self.calls = None, None

    def on_train_begin(self, trainer, logs=None):
        tp.Block.calls = 0

    def on_backward_end(self, batch_idx, trainer=None, logs=None):
        if logs["ends_window"] and self.grads is None:
            self.grads = [local(p.grad).detach().clone() for p in trainer.module.parameters()]
            self.calls = tp.Block.calls


def train(rank: int = 0, **options) -> dict:
    tp.Block.counting = "compile" not in options
    grads = FirstGrads()
    module = tp.model("deep", dropout=0.3)
    trainer = Trainer(module, torch.optim.SGD(module.parameters(), lr=0.1), nn.CrossEntropyLoss(), seed=0,
                      gradient_accumulation_steps=2, progress_bar=False, handle_signals=False, callbacks=[grads],
                      **options)
    x, y = tp.data(64)
    batches = tp.rank_batches(tp.global_batches(x, y, 0, 8), trainer.strategy.data_rank,
                              trainer.strategy.data_world_size)
    trainer.fit(batches, num_epochs=1)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(trainer.module, options=StateDictOptions(full_state_dict=True))
    return {"grads": grads.grads, "calls": grads.calls, "weights": {k: v.detach().clone() for k, v in weights.items()},
            "keys": list(trainer.module.state_dict()), "steps": trainer.global_step}


def same(a: dict, b: dict) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a["grads"], b["grads"]))
    assert a["weights"].keys() == b["weights"].keys()
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert a["keys"] == b["keys"] and a["steps"] == b["steps"] == 4
