"""Custom callbacks as a user writes them: early stopping, a collective, next to the best checkpoint.

    python launch/custom_callbacks.py                                  # one process
    bash launch/torchrun.sh --script launch/custom_callbacks.py        # 2 CPU processes, or 1 per GPU
    python launch/custom_callbacks.py --max-steps 5                    # a quick try-out

- ``ModelCheckpoint(monitor="val_loss")`` keeps ``best.ckpt``, the weights of the epoch with the
  lowest validation loss, in ``--checkpoint-dir``.
- ``EarlyStopping`` (below) stops when the validation loss has stopped improving. Epoch metrics are
  global (identical on every rank), so every rank decides alike, at the same epoch, with no
  communication of its own.
- ``SamplesSeen`` (below) counts the training samples each rank reads and adds the counts up over
  all ranks with an all-reduce at each epoch end: a callback that takes part in a collective. Every
  rank runs every hook, in list order, so every rank joins it.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from anndist import Callback, LoggingCallback, ModelCheckpoint, Trainer, seed_everything
from digits_data import digits_loaders
from example_support import add_common_args, limit_threads, report_missing_dependency
from train_digits import digits_model

# A logger under "anndist": the Trainer configures it for its rank, so info prints on rank 0 only.
log = logging.getLogger("anndist.examples")


class EarlyStopping(Callback):
    """Stop once ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    (anndist ships one, ``anndist.EarlyStopping``, which also judges step-mode evaluations and can
    restore the best weights; this one shows how a callback decides alike on every rank.) ``best`` is
    the best value seen, however small its lead, so it agrees with ``ModelCheckpoint``'s best and the
    closing line; ``min_delta`` only decides whether the count starts again. The state is saved in
    checkpoints, so a resumed run keeps counting.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 3, min_delta: float = 0.0) -> None:
        if patience < 1:
            raise ValueError(f"patience={patience} must be >= 1 (epochs without improvement before stopping)")
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.best, self.best_epoch, self.reference, self.waited = float("inf"), None, float("inf"), 0

    def on_epoch_end(self, epoch: int, trainer: Any, logs: dict | None = None) -> None:
        value = logs[self.monitor]  # global: the same float on every rank
        if value < self.best:
            self.best, self.best_epoch = value, epoch
        if value < self.reference - self.min_delta:  # an improvement that counts
            self.reference, self.waited = value, 0
            return
        self.waited += 1
        if self.waited >= self.patience:
            trainer.stop_training = True  # every rank sets it at this same epoch
            log.info(
                "early stop after epoch %d: %s has not improved by more than %g for %d epoch(s) (best %.4f, epoch %s)",
                epoch, self.monitor, self.min_delta, self.waited, self.best, self.best_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "reference": self.reference, "waited": self.waited}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.waited = state["best"], state["best_epoch"], state["waited"]
        self.reference = state["reference"]


class SamplesSeen(Callback):
    """Each epoch, the training samples read by all ranks together: one all-reduce at the epoch end.

    With N ranks the total can exceed the dataset by up to N-1: the distributed sampler repeats a
    few samples so that every rank takes the same number of steps (evaluation counts each once).
    """

    def __init__(self) -> None:
        self.count = 0
        self.totals: list[int] = []  # per epoch, identical on every rank

    def on_epoch_begin(self, epoch: int, trainer: Any, logs: dict | None = None) -> None:
        self.count = 0

    def on_batch_end(self, batch_idx: int, trainer: Any, logs: dict | None = None) -> None:
        self.count += logs["batch_size"]  # this rank's samples in this micro-batch

    def on_epoch_end(self, epoch: int, trainer: Any, logs: dict | None = None) -> None:
        total = torch.tensor([self.count], dtype=torch.int64, device=trainer.device)
        if dist.is_initialized():
            dist.all_reduce(total)  # every rank is here: the Trainer calls on_epoch_end on all of them
        self.totals.append(int(total.item()))
        log.info("epoch %d: %d training samples read by %d rank(s) (rank 0 read %d)",
                 epoch, self.totals[-1], trainer.world_size, self.count)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, epochs=100)  # early stopping ends it sooner
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--patience", type=int, default=3, help="epochs without improvement before stopping")
    parser.add_argument("--min-delta", type=float, default=1e-3, help="smallest val_loss decrease that counts")
    parser.add_argument("--checkpoint-dir", default="runs/custom_callbacks", help="best.ckpt goes here")
    return parser.parse_args(argv)


@record
@report_missing_dependency
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    limit_threads()
    seed_everything(args.seed)
    train_loader, val_loader = digits_loaders(args.batch_size)
    model = digits_model()
    callbacks = [
        LoggingCallback(log_interval=args.log_interval),  # first: an epoch's line before what the others say
        ModelCheckpoint(monitor="val_loss", every_n_epochs=None),  # best.ckpt only, in checkpoint_dir
        EarlyStopping("val_loss", patience=args.patience, min_delta=args.min_delta),
        SamplesSeen(),
    ]
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-3), nn.CrossEntropyLoss(),
                      callbacks=callbacks, seed=args.seed, checkpoint_dir=args.checkpoint_dir)
    history = trainer.fit(train_loader, num_epochs=args.epochs, max_steps=args.max_steps, val_loader=val_loader)
    trainer.close()
    return history


if __name__ == "__main__":
    main()
