"""Under torchrun: training (``strategy`` "fsdp" or "ddp", the second argument) that saves asynchronously
after every optimizer step, forever (a test kills it with SIGKILL at a random moment), resuming from the
folder's latest checkpoint as a requeued job does. Each rank prints its pid; rank 0 prints "saved" once the
run has taken 3 steps of its own."""
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from anndist import Trainer
from anndist.callbacks import Callback, ModelCheckpoint


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 4))


class Announce(Callback):
    start = None

    def on_train_begin(self, trainer=None, logs=None):
        self.start = trainer.global_step

    def on_batch_end(self, batch_idx, trainer=None, logs=None):
        if trainer.global_step == self.start + 3 and trainer.is_main_process:
            print("saved", flush=True)


def main(folder: str, strategy: str) -> None:
    print("pid", os.getpid(), flush=True)  # torchrun starts each worker in a session of its own
    net = model()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4096, 64, generator=g), torch.randint(0, 4, (4096,), generator=g))
    trainer = Trainer(net, torch.optim.AdamW(net.parameters(), lr=1e-3), nn.CrossEntropyLoss(), strategy=strategy,
                      async_checkpoint=True, seed=0, progress_bar=False, checkpoint_dir=folder, auto_resume=True,
                      callbacks=[ModelCheckpoint(folder, every_n_steps=1, every_n_epochs=None, keep_last=2), Announce()])
    trainer.fit(DataLoader(data, batch_size=8), num_epochs=1000)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
