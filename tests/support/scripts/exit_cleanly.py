"""A user script that trains with DDP and simply ends: no close(), no destroy_process_group()."""
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # tests/, for support
from support import make_dataset, make_model  # noqa: E402

from anndist import Trainer  # noqa: E402

model = make_model()
trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), seed=0)
trainer.fit(DataLoader(make_dataset(64), batch_size=8, shuffle=True), num_epochs=1)
print(f"rank {trainer.rank} done", flush=True)
