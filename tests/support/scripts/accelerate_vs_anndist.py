"""Same model, data order and seed trained by Accelerate and by anndist under one torchrun; rank 0 saves both."""
import gc
import os
import sys

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # tests/, for support
from support import flat_params, make_dataset, make_model  # noqa: E402

from anndist import Trainer  # noqa: E402

K, B, STEPS_PER_EPOCH, EPOCHS = 4, 4, 3, 2
DATA = make_dataset(2 * B * K * STEPS_PER_EPOCH)  # full windows only


def loader(rank, world_size):
    sampler = DistributedSampler(DATA, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(DATA, batch_size=B, sampler=sampler)


def train_accelerate():
    from accelerate import Accelerator
    accelerator = Accelerator(gradient_accumulation_steps=K, cpu=True)
    model = make_model(hidden=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)  # the loader stays ours: same order as anndist
    data = loader(accelerator.process_index, accelerator.num_processes)
    for _ in range(EPOCHS):
        for x, y in data:
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.cross_entropy(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
    return flat_params(accelerator.unwrap_model(model)), accelerator.num_processes


def train_anndist():
    model = make_model(hidden=32)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), nn.CrossEntropyLoss(),
                      gradient_accumulation_steps=K, rebuild_train_loader=False)
    trainer.fit(loader(trainer.rank, trainer.world_size), num_epochs=EPOCHS)
    trainer.close()  # drops the DDP wrapper; the group is Accelerate's, so it stays
    return flat_params(trainer.module), trainer.global_step


@record
def main():
    accelerate_params, processes = train_accelerate()
    anndist_params, steps = train_anndist()
    if int(os.environ["RANK"]) == 0:
        torch.save({"accelerate": accelerate_params, "anndist": anndist_params, "processes": processes,
                    "steps": steps}, sys.argv[1])
    # Accelerate made the group and leaves it at exit, where gloo can abort (pytorch#190489): end it cleanly.
    gc.collect()
    torch.distributed.destroy_process_group()
    gc.collect()


if __name__ == "__main__":
    main()
