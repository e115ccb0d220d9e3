"""Train a small classifier on scikit-learn's bundled handwritten digits (no download).

Runs the same under ``python`` (one process, for debugging), ``torchrun`` (one node or many) and
SLURM (``srun`` tasks or torchrun inside a job):

    python launch/train_digits.py --epochs 5
    bash launch/torchrun.sh --epochs 20
"""
from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader, TensorDataset

from anndist import LoggingCallback, Trainer, seed_everything


def digits_datasets(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """1437 train / 360 validation images of 8x8 pixels, scaled to [0, 1]."""
    features, labels = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(
        features / 16.0, labels, test_size=0.2, random_state=seed, stratify=labels)
    as_dataset = lambda x, y: TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y))  # noqa: E731
    return as_dataset(x_train, y_train), as_dataset(x_val, y_val)


def digits_model(hidden: int = 256, dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="mixed precision dtype")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--log-interval", type=int, default=20)
    parser.add_argument("--save", default=None, help="write the final weights here (rank 0)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="checkpoint here on SIGUSR1/SIGTERM and resume from here when restarted (SLURM requeue)")
    return parser.parse_args(argv)


@record
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    seed_everything(args.seed)  # identical initial weights on every rank, run after run
    train_set, val_set = digits_datasets()
    model = digits_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    trainer = Trainer(
        model, optimizer, nn.CrossEntropyLoss(),
        callbacks=[LoggingCallback(log_interval=args.log_interval)],
        seed=args.seed, gradient_accumulation_steps=args.accumulation,
        use_amp=args.amp is not None, amp_dtype=args.amp,
        checkpoint_dir=args.checkpoint_dir, auto_resume=args.checkpoint_dir is not None,
    )
    history = trainer.fit(
        DataLoader(train_set, batch_size=args.batch_size, shuffle=True),
        num_epochs=args.epochs,
        val_loader=DataLoader(val_set, batch_size=256),
    )
    if args.save and trainer.is_main_process:
        torch.save(trainer.module.state_dict(), args.save)
    trainer.close()
    return history


if __name__ == "__main__":
    main()
