"""A small CNN on the digits as 8x8 images, with mixed precision, gradient accumulation and profiling.

    python launch/train_cnn.py --epochs 5                                 # one process
    bash launch/torchrun.sh --script launch/train_cnn.py --accumulation 4  # 2 CPU processes, or 1 per GPU
    python launch/train_cnn.py --max-steps 5                              # a quick try-out

Mixed precision is on by default (``--precision bf16``; ``fp16`` on GPUs uses a gradient scaler,
``fp32`` turns it off). ``--accumulation K`` sums the gradients of K micro-batches of
``--batch-size`` per process before each optimizer step, with one all-reduce per step: the same
update as one batch of K x batch-size x processes. ProfilingCallback prints, at the end, where
each step's time went on every rank (data wait, forward, backward, optimizer) and the slowest rank.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from anndist import LoggingCallback, ProfilingCallback, Trainer, seed_everything
from digits_data import NUM_CLASSES, digits_loaders
from example_support import add_common_args, limit_threads, report_missing_dependency


def digits_cnn(channels: int = 16) -> nn.Module:
    """Two 3x3 convolutions and a pooling on [1, 8, 8] images, then a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),                                  # -> [2 * channels, 4, 4]
        nn.Flatten(), nn.Linear(2 * channels * 16, NUM_CLASSES),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, epochs=10)
    parser.add_argument("--batch-size", type=int, default=16, help="micro-batch per process")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16",
                        help="autocast dtype (fp32: no mixed precision); fp16 needs a GPU")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--profile-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="peak memory in the profiling table")
    return parser.parse_args(argv)


@record
@report_missing_dependency
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    limit_threads()
    seed_everything(args.seed)
    train_loader, val_loader = digits_loaders(args.batch_size, images=True)
    model = digits_cnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    trainer = Trainer(
        model, optimizer, nn.CrossEntropyLoss(),
        # LoggingCallback last: its closing line comes after the profiling table.
        callbacks=[ProfilingCallback(profile_memory=args.profile_memory),
                   LoggingCallback(log_interval=args.log_interval)],
        seed=args.seed,
        use_amp=args.precision != "fp32", amp_dtype=None if args.precision == "fp32" else args.precision,
        gradient_accumulation_steps=args.accumulation,
        max_grad_norm=1.0,  # clipped once per optimizer step, after the accumulated gradients are complete
    )
    history = trainer.fit(train_loader, num_epochs=args.epochs, max_steps=args.max_steps, val_loader=val_loader)
    trainer.close()
    return history


if __name__ == "__main__":
    main()
