"""Under torchrun: training (``strategy`` "fsdp" or "ddp", the second argument) that saves asynchronously
after every optimizer step, forever (a test kills it with SIGKILL at a random moment), resuming from the
folder's latest checkpoint as a requeued job does. Each rank prints its pid; rank 0 prints "saved" once a
checkpoint of its own third step (or later) is committed, so a kill from then on must leave one at least
that far."""
import os
import re
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from anndist import Trainer
from anndist.checkpoint import latest_checkpoint
from anndist.callbacks import Callback, ModelCheckpoint


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 4))


class Announce(Callback):
    """Rank 0 says "saved" once: when the folder's latest checkpoint is 3 steps past where this run began
    (asynchronous saves commit later than the step that starts them: the step alone would not do)."""

    def __init__(self, folder: str) -> None:
        self.folder, self.start, self.said = folder, None, False

    def on_train_begin(self, trainer=None, logs=None):
        self.start = trainer.global_step

    def on_batch_end(self, batch_idx, trainer=None, logs=None):
        if self.said or not trainer.is_main_process:
            return
        found = latest_checkpoint(self.folder)
        if found is not None and int(re.search(r"step-(\d+)", found.name).group(1)) >= self.start + 3:
            print("saved", flush=True)
            self.said = True


def main(folder: str, strategy: str) -> None:
    print("pid", os.getpid(), flush=True)  # torchrun starts each worker in a session of its own
    net = model()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4096, 64, generator=g), torch.randint(0, 4, (4096,), generator=g))
    trainer = Trainer(net, torch.optim.AdamW(net.parameters(), lr=1e-3), nn.CrossEntropyLoss(), strategy=strategy,
                      async_checkpoint=True, seed=0, progress_bar=False, checkpoint_dir=folder, auto_resume=True,
                      callbacks=[ModelCheckpoint(folder, every_n_steps=1, every_n_epochs=None, keep_last=2), Announce(folder)])
    trainer.fit(DataLoader(data, batch_size=8), num_epochs=1000)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
