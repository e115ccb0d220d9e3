"""Rank FAIL_RANK raises inside a callback at optimizer step 3; the other ranks are mid-collective."""
import os
import sys

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # tests/, for support
from support import make_dataset, make_model  # noqa: E402

from anndist import Callback, Trainer  # noqa: E402


class Boom(Callback):
    def on_batch_end(self, batch_idx, trainer, logs=None):
        if trainer.rank == int(os.environ["FAIL_RANK"]) and trainer.global_step == 3:
            raise ValueError(f"boom on rank {trainer.rank}")


@record
def main():
    model = make_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                      callbacks=[Boom()], dist_timeout=600)
    trainer.fit(DataLoader(make_dataset(4096), batch_size=4), num_epochs=50)


if __name__ == "__main__":
    main()
