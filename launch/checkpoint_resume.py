"""Checkpoints, preemption and resume: a run that may be cut off at any step and continues exactly.

    python launch/checkpoint_resume.py --checkpoint-dir runs/resume --preempt-at-step 50   # saves, exits 75
    python launch/checkpoint_resume.py --checkpoint-dir runs/resume     # resumes at step 50, runs to the end
    (`kill -USR1 PID` or `kill -TERM PID` on a running one is the real thing: the same stop, save, exit 75)
    torchrun --standalone --nproc_per_node=2 --max-restarts=1 launch/checkpoint_resume.py \\
        --checkpoint-dir runs/resume --preempt-at-step 50               # torchrun restarts, the run resumes
    sbatch slurm/single_node.sbatch launch/checkpoint_resume.py --checkpoint-dir runs/resume  # requeue

What it uses: ``Trainer(checkpoint_dir=..., auto_resume=True)`` resumes from the folder's latest
checkpoint when there is one; ``ModelCheckpoint(every_n_steps=...)`` saves ``step-<N>.ckpt``
periodically (mid-epoch too), keeping the newest ``--keep-last``; on SIGUSR1 or SIGTERM every rank
finishes the same step, the state is saved and the process exits 75 (SIGUSR1 inside a SLURM job
also requeues it). The metrics file in the same folder continues across resumes
(``python -m anndist.plot runs/resume/metrics.jsonl`` marks each resume).
"""
from __future__ import annotations

import argparse
import os
import signal
from typing import Any

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from anndist import Callback, LoggingCallback, ModelCheckpoint, Trainer, seed_everything
from digits_data import digits_loaders
from example_support import add_common_args, limit_threads, report_missing_dependency
from train_digits import digits_model


class PreemptAtStep(Callback):
    """Sends SIGUSR1 to rank 0's own process after optimizer step ``step``, as Slurm does before a time limit.

    Only rank 0 gets it, as when a signal reaches one node first: the Trainer's stop agreement stops
    every rank after the same step. A run that resumed at or past ``step`` is not interrupted again.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.armed = False

    def on_train_begin(self, trainer: Any, logs: dict | None = None) -> None:
        self.armed = trainer.is_main_process and trainer.global_step < self.step

    def on_batch_end(self, batch_idx: int, trainer: Any, logs: dict | None = None) -> None:
        if self.armed and trainer.global_step >= self.step:
            self.armed = False
            os.kill(os.getpid(), signal.SIGUSR1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, epochs=10)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--checkpoint-dir", default="runs/resume",
                        help="checkpoints and metrics.jsonl; a rerun resumes from its latest checkpoint")
    parser.add_argument("--save-every", type=int, default=50, metavar="STEPS", help="periodic checkpoint interval")
    parser.add_argument("--keep-last", type=int, default=2, help="periodic checkpoints to keep")
    parser.add_argument("--resume-from", default=None, metavar="PATH",
                        help="resume from this checkpoint file or folder instead of the latest in --checkpoint-dir")
    parser.add_argument("--preempt-at-step", type=int, default=None, metavar="N",
                        help="simulate a preemption: SIGUSR1 to rank 0 after step N (not again after the resume)")
    return parser.parse_args(argv)


@record
@report_missing_dependency
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    limit_threads()
    seed_everything(args.seed)
    train_loader, val_loader = digits_loaders(args.batch_size)
    model = digits_model()
    callbacks = [ModelCheckpoint(every_n_steps=args.save_every, every_n_epochs=None, keep_last=args.keep_last),
                 LoggingCallback(log_interval=args.log_interval, log_dir=args.checkpoint_dir)]
    if args.preempt_at_step is not None:
        callbacks.append(PreemptAtStep(args.preempt_at_step))
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-3), nn.CrossEntropyLoss(),
                      callbacks=callbacks, seed=args.seed,  # a seed makes the resumed run continue bit for bit
                      checkpoint_dir=args.checkpoint_dir, auto_resume=True)
    history = trainer.fit(train_loader, num_epochs=args.epochs, max_steps=args.max_steps, val_loader=val_loader,
                          resume_from=args.resume_from)
    trainer.close()
    return history


if __name__ == "__main__":
    main()
