"""A run whose experiment tracker is down: ``mlflow URI`` or ``wandb URL`` (W&B online at that server).

    python tracker_down.py mlflow|wandb URL DIR CLOSE_TIMEOUT

Trains 2 epochs of 8 steps and prints ``fit took S s, step N``; the test bounds S and the process's
own run time.
"""
import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # tests/, for support
from support import make_dataset, make_model  # noqa: E402
from anndist import MLflowCallback, Trainer, WandbCallback

which, url, folder, close_timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
if which == "mlflow":
    tracker = MLflowCallback(url, experiment="down", log_interval=2, close_timeout=close_timeout)
else:
    os.environ.update(WANDB_BASE_URL=url, WANDB_API_KEY="0" * 40, WANDB_SILENT="true")
    tracker = WandbCallback("down", mode="online", dir=folder, log_interval=2, close_timeout=close_timeout)
model = make_model()
trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), callbacks=[tracker],
                  progress_bar=False, handle_signals=False, seed=0)
started = time.monotonic()
trainer.fit(DataLoader(make_dataset(64), batch_size=8), num_epochs=2)
print(f"fit took {time.monotonic() - started:.1f} s, step {trainer.global_step}", flush=True)
if which == "wandb":
    tracker.finish()  # what the end of the process does too; bounded by close_timeout
