"""A 2-rank job whose rank 1 hangs in a callback; the watchdog must end it. Args: checkpoint_dir."""
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Callback, Trainer
from support import make_dataset, make_model


class SleepOnRank1(Callback):
    def on_batch_end(self, batch_idx, trainer, logs=None):
        if trainer.rank == 1 and batch_idx == 5:
            time.sleep(600)  # the deliberately hung rank


model = make_model()
trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), callbacks=[SleepOnRank1()],
                  watchdog_timeout=3, dist_timeout=120, checkpoint_dir=sys.argv[1], progress_bar=False)
trainer.fit(DataLoader(make_dataset(256), batch_size=4), num_epochs=1)
