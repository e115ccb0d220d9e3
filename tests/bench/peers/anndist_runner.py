"""anndist's Trainer on the shared workload, the way its README shows it.

    torchrun --standalone --nproc_per_node=2 tests/bench/peers/anndist_runner.py \
        --size small --data D --steps N --out P

The loader is the user's plain ``DataLoader(shuffle=True)``: the Trainer shards it with a
``DistributedSampler``-compatible sampler seeded with ``seed``, so each rank reads the reference's order.
"""
import os

from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader

import workload
from anndist import Trainer
from workload import K


@record
def main() -> None:
    args = workload.parse_args(__doc__.splitlines()[0])
    clock, audit = workload.start(args)
    # --- the training job ---
    model = workload.build_model(args.size)
    optimizer = workload.build_optimizer(model.parameters())
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), gradient_accumulation_steps=K, seed=workload.SEED,
                      compile=args.compile)
    dataset = workload.load_dataset(args.data)
    loader = DataLoader(dataset, batch_size=workload.SIZES[args.size].batch, shuffle=True)
    if audit is not None and trainer.model is not trainer.module:
        audit.register(trainer.model)
    trainer.fit(loader, num_epochs=1)
    # --- end of the training job ---
    workload.finish(args, clock, trainer.module, audit)
    trainer.close()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
