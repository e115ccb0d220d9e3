"""A long run planned in steps over a stream: evaluation every N steps, early stopping, an MLflow run.

    python launch/train_stream.py --max-steps 300 --eval-every 50                    # one process
    bash launch/torchrun.sh --script launch/train_stream.py --tracking-uri file:runs/mlruns
    sbatch slurm/single_node.sbatch launch/train_stream.py --checkpoint-dir runs/stream   # requeued: same run

The training data is an ``IterableDataset`` that shards itself: each rank streams its own share of
the digits with random augmentation (pixel noise), and the shards differ in length between ranks,
as files of a real corpus do; the Trainer ends every epoch of the stream at the same step on every
rank. Training is planned in optimizer steps (``--max-steps``) and evaluated every ``--eval-every``
steps across epoch boundaries; ``EarlyStopping`` watches those evaluations. With ``--tracking-uri``
an ``MLflowCallback`` records the run (rank 0 only); its run id lives in the checkpoint, so a requeued
job (``--checkpoint-dir``) continues the same MLflow run with increasing steps.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader, IterableDataset

from anndist import Callback, EarlyStopping, LoggingCallback, MLflowCallback, Trainer, seed_everything
from digits_data import digits_datasets
from example_support import limit_threads, report_missing_dependency
from train_digits import digits_model


class DigitStream(IterableDataset):
    """Rank ``rank``'s stream: its share of the training images, in a fresh order each pass, with
    noise; rank r's share is cut ``r`` samples short so that the ranks' streams end apart."""

    def __init__(self, rank: int, world_size: int, seed: int) -> None:
        self.rank, self.world_size, self.seed, self.passes = rank, world_size, seed, 0
        self.images, self.labels = digits_datasets(seed)[0].tensors

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + 1000 * self.passes + self.rank)
        self.passes += 1
        mine = torch.arange(self.rank, len(self.labels), self.world_size)
        mine = mine[torch.randperm(len(mine), generator=g)][:len(mine) - self.rank]
        for i in mine.tolist():
            yield self.images[i] + 0.05 * torch.randn(64, generator=g), self.labels[i]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=400, help="optimizer steps to train (the plan)")
    parser.add_argument("--eval-every", type=int, default=50, help="optimizer steps between evaluations")
    parser.add_argument("--patience", type=int, default=4, help="evaluations without improvement before stopping")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--log-interval", type=int, default=50)
    parser.add_argument("--tracking-uri", default=None, help="an MLflow tracking URI, e.g. file:runs/mlruns")
    parser.add_argument("--checkpoint-dir", default=None, help="save on preemption, resume from it (auto_resume)")
    return parser.parse_args(argv)


@record
@report_missing_dependency
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    limit_threads()
    seed_everything(args.seed)
    model = digits_model()
    callbacks: list[Callback] = [EarlyStopping(monitor="val_loss", patience=args.patience),
                                 LoggingCallback(log_interval=args.log_interval, log_dir=args.checkpoint_dir)]
    if args.tracking_uri:
        callbacks.append(MLflowCallback(tracking_uri=args.tracking_uri, experiment="digits-stream"))
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=args.lr), nn.CrossEntropyLoss(),
                      callbacks=callbacks, seed=args.seed, checkpoint_dir=args.checkpoint_dir,
                      auto_resume=args.checkpoint_dir is not None)
    stream = DataLoader(DigitStream(trainer.rank, trainer.world_size, args.seed), batch_size=args.batch_size)
    val_loader = DataLoader(digits_datasets(args.seed)[1], batch_size=256)
    history = trainer.fit(stream, max_steps=args.max_steps, val_loader=val_loader, eval_every_n_steps=args.eval_every)
    trainer.close()
    return history


if __name__ == "__main__":
    main()
