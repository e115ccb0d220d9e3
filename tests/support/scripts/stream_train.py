"""A run over a stream whose shards differ between ranks, for the long-run tests under torchrun.

``--loader stateful``: torchdata's StatefulDataLoader over an IterableDataset (resumes mid-epoch
exactly); ``--loader plain``: a re-iterable object of batches (cannot resume mid-epoch: a restart
repeats the epoch). Rank r's shard holds ``SHARD + 2 * r`` batches, so the ranks' streams end at
different micro-batches. ``--signal-step S`` sends SIGUSR1 to rank 1 after optimizer step S (first
run only). Rank 0 saves the final weights and step count to ``--out``.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import IterableDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # tests/, for support
from support import flat_params, make_model  # noqa: E402

from anndist import Callback, Trainer  # noqa: E402
from anndist.dist import collectives  # noqa: E402

SHARD, BATCH, K = 9, 4, 2


class Shard(IterableDataset):
    """This rank's stream: samples drawn from a generator seeded by rank (and epoch via the loader)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __iter__(self):
        g = torch.Generator().manual_seed(100 + self.rank)
        for _ in range((SHARD + 2 * self.rank) * BATCH):
            x = torch.randn(8, generator=g)
            yield x, int(x.sum() > 0)


class PlainBatches:
    """A re-iterable stream of batches with no state_dict: it can only start an epoch from the beginning."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __iter__(self):
        g = torch.Generator().manual_seed(100 + self.rank)
        for _ in range(SHARD + 2 * self.rank):
            x = torch.randn(BATCH, 8, generator=g)
            yield x, (x.sum(1) > 0).long()


class SignalRank1(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_batch_end(self, batch_idx, trainer, logs=None):
        if trainer.rank == 1 and logs["ends_window"] and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


@record
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loader", choices=["stateful", "plain"], required=True)
    parser.add_argument("--signal-step", type=int, default=-1)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = make_model(dropout=0.2)
    callbacks = [SignalRank1(args.signal_step)] if args.signal_step > 0 else []
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=0.01), torch.nn.CrossEntropyLoss(),
                      callbacks=callbacks, seed=3, gradient_accumulation_steps=K, stop_check_period=0,
                      checkpoint_dir=args.checkpoint_dir, auto_resume=args.checkpoint_dir is not None,
                      progress_bar=False)
    if args.loader == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader
        loader = StatefulDataLoader(Shard(trainer.rank), batch_size=BATCH)
    else:
        loader = PlainBatches(trainer.rank)
    trainer.fit(loader, num_epochs=2)
    steps = collectives.all_gather_object(trainer.global_step)
    if trainer.is_main_process:
        torch.save({"params": flat_params(trainer.module), "steps": steps, "history": trainer.history}, args.out)
    trainer.close()


if __name__ == "__main__":
    main()
