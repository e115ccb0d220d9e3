"""Hugging Face Accelerate's ``Accelerator`` with ``accumulate()`` on the shared workload.

    torchrun --standalone --nproc_per_node=2 tests/bench/peers/accelerate_runner.py \
        --size small --data D --steps N --out P

``cpu=True`` matters: without it, Accelerate under torchrun on a machine without GPUs trains each
rank on its own, not distributed. ``prepare`` shards the loader by handing rank r the global batches
r, r+W, ...; the global order is chosen so that each rank reads the reference's batches.
"""
import os

from accelerate import Accelerator
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader

import workload
from workload import K


@record
def main() -> None:
    args = workload.parse_args(__doc__.splitlines()[0])
    clock, audit = workload.start(args)
    # --- the training job ---
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=K)
    model = workload.build_model(args.size)
    optimizer = workload.build_optimizer(model.parameters())
    criterion = nn.CrossEntropyLoss()
    dataset = workload.load_dataset(args.data)
    batches = workload.InterleavedBatches(dataset, accelerator.num_processes, workload.SIZES[args.size].batch)
    loader = DataLoader(dataset, batch_sampler=batches)
    bare = model
    model, optimizer, loader = accelerator.prepare(workload.compiled(model, args), optimizer, loader)
    if audit is not None and accelerator.num_processes > 1:
        audit.register(model)

    model.train()
    for inputs, targets in loader:
        with accelerator.accumulate(model):
            loss = criterion(model(inputs), targets)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    # --- end of the training job ---
    workload.finish(args, clock, bare, audit,
                    distributed_type=str(accelerator.distributed_type))
    model = optimizer = loader = None
    accelerator.free_memory()
    workload.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
