"""One of the peer benchmark's two invariants that could silently break the comparison (the other, the
audit of gradient rounds, is in tests/multiprocess/test_bench_peers.py): Accelerate's loader sharding,
fed ``InterleavedBatches``, gives every rank exactly the batches of the reference's
``DistributedSampler`` (otherwise Accelerate trains on another order).
"""
import sys

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import TensorDataset

from support import ROOT

sys.path.insert(0, str(ROOT / "tests" / "bench" / "peers"))
import workload  # noqa: E402


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_accelerate_sharding_of_interleaved_batches_is_the_reference_order(world_size):
    batch = 8
    dataset = TensorDataset(torch.arange(batch * 5 * world_size))
    global_order = workload.InterleavedBatches(dataset, world_size, batch)
    for rank in range(world_size):
        reference = list(workload.rank_sampler(dataset, rank, world_size))
        expected = [reference[i:i + batch] for i in range(0, len(reference), batch)]
        sharded = BatchSamplerShard(global_order, num_processes=world_size, process_index=rank)
        assert list(sharded) == expected
