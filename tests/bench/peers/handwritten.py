"""The reference: a hand-written DDP loop with gradient accumulation (``no_sync`` on all but the last micro-batch).

    torchrun --standalone --nproc_per_node=2 tests/bench/peers/handwritten.py \
        --size small --data D --steps N --out P
"""
import contextlib
import os

import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import workload
from workload import K


@record
def main() -> None:
    args = workload.parse_args(__doc__.splitlines()[0])
    clock, audit = workload.start(args)
    # --- the training job ---
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = workload.build_model(args.size)
    net = workload.compiled(model, args)
    ddp = DDP(net) if world_size > 1 else net
    optimizer = workload.build_optimizer(model.parameters())
    criterion = nn.CrossEntropyLoss()
    dataset = workload.load_dataset(args.data)
    sampler = workload.rank_sampler(dataset, rank, world_size)
    loader = DataLoader(dataset, batch_size=workload.SIZES[args.size].batch, sampler=sampler)
    if audit is not None and ddp is not net:
        audit.register(ddp)

    sampler.set_epoch(0)
    ddp.train()
    for i, (inputs, targets) in enumerate(loader):
        ends_window = (i + 1) % K == 0
        sync = contextlib.nullcontext() if ends_window or ddp is net else ddp.no_sync()
        with sync:
            loss = criterion(ddp(inputs), targets) / K
            loss.backward()
        if ends_window:
            optimizer.step()
            optimizer.zero_grad()
    # --- end of the training job ---
    workload.finish(args, clock, model, audit)
    del ddp
    workload.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
