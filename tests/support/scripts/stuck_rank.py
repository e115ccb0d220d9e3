"""A 2-rank job whose rank 1 gets stuck in a callback, without the watchdog: the collective timeout
(dist_timeout=5) must end rank 0 with an error naming rank 1. Started as plain processes with
torchrun's variables (no agent), so the test sees rank 0's own exit."""
import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # tests/, for support
from support import make_dataset, make_model  # noqa: E402
from anndist import Callback, Trainer


class StuckOnRank1(Callback):
    def on_batch_end(self, batch_idx, trainer, logs=None):
        if trainer.rank == 1 and batch_idx == 5:
            print(f"stuck at {time.time()}", file=sys.stderr, flush=True)
            time.sleep(600)  # the stuck rank: in user code, outside any collective


model = make_model()
trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                  callbacks=[StuckOnRank1()], dist_timeout=5, progress_bar=False)
trainer.fit(DataLoader(make_dataset(256), batch_size=4), num_epochs=1)
