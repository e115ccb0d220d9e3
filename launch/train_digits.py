"""Train a small classifier on scikit-learn's bundled handwritten digits (no download).

Runs the same under ``python`` (one process, for debugging), ``torchrun`` (one node or many) and
SLURM (``srun`` tasks or torchrun inside a job):

    python launch/train_digits.py --epochs 5
    bash launch/torchrun.sh --epochs 20 --log-dir runs/digits --profile
    python -m anndist.plot runs/digits/metrics.jsonl -o runs/digits/curves.png
    python launch/train_digits.py --max-steps 5               # a quick try-out

``digits_model`` and the data (``digits_data.py``) are shared with the other examples (launch/README.md).
"""
from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from anndist import (Callback, LoggingCallback, ModelCheckpoint, ProfilingCallback, TensorBoardCallback, Trainer,
                     seed_everything)
from digits_data import digits_datasets, digits_loaders  # noqa: F401 (benchmarks import digits_datasets from here)
from example_support import add_common_args, limit_threads, report_missing_dependency


def digits_model(hidden: int = 256, dropout: float = 0.1) -> nn.Module:
    """The digits classifier: an MLP 64-256-10 on the flattened 8x8 images."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, epochs=20)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--global-batch-size", type=int, default=None,
                        help="samples per optimizer step over all ranks, instead of --accumulation: the same steps "
                             "on any number of ranks (resumes on other node counts, elastic torchrun: docs/elastic.md)")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="mixed precision dtype")
    parser.add_argument("--log-dir", default=None, help="append metrics.jsonl here (plot: python -m anndist.plot)")
    parser.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars to LOG_DIR/tb")
    parser.add_argument("--profile", action="store_true", help="time each step's phases; a table at the end")
    parser.add_argument("--trace-steps", type=int, nargs=2, metavar=("START", "STOP"), default=None,
                        help="with --profile: torch.profiler traces of these optimizer steps in LOG_DIR/traces")
    parser.add_argument("--progress-bar", action=argparse.BooleanOptionalAction, default=None,
                        help="tqdm bar on rank 0 (default: when stderr is a terminal, not under CI)")
    parser.add_argument("--save", default=None, help="write the final weights here (rank 0)")
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                        help="replicate the model (ddp) or shard it with FSDP2 (fsdp)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="checkpoint here on SIGUSR1/SIGTERM and resume from here when restarted (SLURM requeue)")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                        help="with --checkpoint-dir: also save every STEPS optimizer steps (a crash loses fewer)")
    args = parser.parse_args(argv)
    if (args.tensorboard or args.trace_steps) and args.log_dir is None:
        parser.error("--tensorboard and --trace-steps write under --log-dir; pass --log-dir DIR")
    if args.trace_steps and not args.profile:
        parser.error("--trace-steps needs --profile")
    if args.global_batch_size is not None and args.accumulation != 1:
        parser.error("--global-batch-size sets the micro-batches per step itself; leave out --accumulation")
    if args.checkpoint_every is not None and args.checkpoint_dir is None:
        parser.error("--checkpoint-every saves under --checkpoint-dir; pass --checkpoint-dir DIR")
    return args


def observers(args: argparse.Namespace) -> list[Callback]:
    """The callbacks that show the run: TensorBoard, profiling, log lines (and metrics.jsonl).

    LoggingCallback comes last so that its closing line is the run's last line.
    """
    callbacks: list[Callback] = []
    if args.tensorboard:
        callbacks.append(TensorBoardCallback(f"{args.log_dir}/tb", log_interval=args.log_interval))
    if args.profile:
        trace_dir = f"{args.log_dir}/traces" if args.trace_steps else None
        callbacks.append(ProfilingCallback(trace_dir=trace_dir, trace_steps=args.trace_steps))
    if args.checkpoint_every is not None:
        callbacks.append(ModelCheckpoint(every_n_steps=args.checkpoint_every))
    callbacks.append(LoggingCallback(log_interval=args.log_interval, log_dir=args.log_dir))
    return callbacks


@record  # under torchrun: the failing rank and its traceback in torchrun's summary
@report_missing_dependency  # a missing optional package: one line, not a traceback per rank
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    limit_threads()
    seed_everything(args.seed)  # identical initial weights on every rank, run after run
    train_loader, val_loader = digits_loaders(args.batch_size)
    model = digits_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    trainer = Trainer(
        model, optimizer, nn.CrossEntropyLoss(),
        callbacks=observers(args),
        seed=args.seed, gradient_accumulation_steps=None if args.global_batch_size else args.accumulation,
        global_batch_size=args.global_batch_size,
        use_amp=args.amp is not None, amp_dtype=args.amp, progress_bar=args.progress_bar,
        checkpoint_dir=args.checkpoint_dir, auto_resume=args.checkpoint_dir is not None, strategy=args.strategy,
    )
    history = trainer.fit(train_loader, num_epochs=args.epochs, max_steps=args.max_steps, val_loader=val_loader)
    if args.save:
        weights = trainer.state_dict()["model"]  # on every rank: gathers the shards to rank 0 under fsdp
        if trainer.is_main_process:
            torch.save(weights, args.save)
    trainer.close()
    return history


if __name__ == "__main__":
    main()
