"""A rank that reads its batches through DataLoader worker processes and prints each optimizer step,
so that a test can send a TERM to its whole process group mid-training, as Slurm's proctrack does
at a time limit, on scancel or on a preemption (workers included).

    python term_workers.py --persistent 0|1 --checkpoint-dir DIR --epochs N --out WEIGHTS.pt
"""
import argparse
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # tests/, for support
from support import flat_params, make_dataset, make_model  # noqa: E402

from anndist import Callback, Trainer  # noqa: E402


class Samples(Dataset):
    """Read one sample at a time, in the workers."""

    def __init__(self, n):
        self.data = make_dataset(n)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        return self.data[index]


class Announce(Callback):
    def on_batch_end(self, batch_idx, trainer, logs=None):
        if logs["stepped"]:
            print(f"step {trainer.global_step} workers {' '.join(map(str, worker_pids()))}", flush=True)


def worker_pids():
    import multiprocessing
    return sorted(child.pid for child in multiprocessing.active_children())


parser = argparse.ArgumentParser()
parser.add_argument("--persistent", type=int, required=True)
parser.add_argument("--checkpoint-dir", required=True)
parser.add_argument("--epochs", type=int, required=True)
parser.add_argument("--out", required=True)
args = parser.parse_args()

model = make_model()
trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), callbacks=[Announce()],
                  seed=0, checkpoint_dir=args.checkpoint_dir, auto_resume=True, progress_bar=False)
loader = DataLoader(Samples(256), batch_size=8, shuffle=True, num_workers=2, persistent_workers=bool(args.persistent))
trainer.fit(loader, num_epochs=args.epochs)
torch.save({"params": flat_params(trainer.module), "step": trainer.global_step}, args.out)
print(f"fit returned at step {trainer.global_step}", flush=True)
