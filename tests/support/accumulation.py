"""The runs of the accumulation tests (tests/unit and tests/multiprocess test_accumulation.py): anndist with K
micro-batches per step, and plain training with one large batch per step on the same samples."""
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import DataLoader

from anndist import Callback, Trainer

from .models import flat_params, make_dataset, make_model

N, B, K, SEED, EPOCHS, LR = 60, 4, 3, 17, 2, 0.05  # 30 samples per rank: windows of 12, 12 and a short 6 (4 + 2)


class WindowLog(Callback):
    def __init__(self):
        self.ends = []

    def on_backward_end(self, batch_idx, trainer, logs=None):
        self.ends.append((batch_idx, logs["ends_window"]))


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def train_anndist(world_size, batch_size, k, count_rounds=False, **options):
    model = make_model(hidden=32)
    window_log = WindowLog()
    trainer = Trainer(model, _sgd(model), nn.CrossEntropyLoss(), callbacks=[window_log],
                      gradient_accumulation_steps=k, seed=SEED, **options)
    rounds = []
    if count_rounds:
        def counting_hook(state, bucket):
            state.append((trainer.global_step, bucket.index()))
            return allreduce_hook(None, bucket)
        trainer.model.register_comm_hook(rounds, counting_hook)
    history = trainer.fit(DataLoader(make_dataset(N), batch_size=batch_size, shuffle=True), num_epochs=EPOCHS)
    return {"params": flat_params(trainer.module), "steps": trainer.global_step, "rounds": rounds,
            "ends": window_log.ends, "train_loss": history["train_loss"],
            "bucket_view": getattr(trainer.model, "gradient_as_bucket_view", None)}


def train_reference(window):
    """Plain single-process training on the same samples, one big batch per optimizer step.

    Returns the final weights and each epoch's train loss: the mean over the epoch's samples of the
    loss each sample had when it was trained (the weights do not change inside a window)."""
    model = make_model(hidden=32)
    optimizer, data = _sgd(model), make_dataset(N)
    train_loss = []
    for epoch in range(EPOCHS):
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(SEED + epoch))  # DistributedSampler's order
        loss_sum = 0.0
        for start in range(0, N, window):
            x, y = data[perm[start:start + window]]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
        train_loss.append(loss_sum / N)
    return flat_params(model), train_loss
