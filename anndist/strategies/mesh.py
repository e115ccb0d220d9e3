"""The ranks as a 2-D grid for tensor parallelism: ``init_device_mesh(device, (dp, tp), ("dp", "tp"))``.

Rank ``r`` sits at ``(r // tp, r % tp)``: the ranks of one tensor-parallel group are consecutive
(on one node, where their per-layer collectives are cheapest), and the ranks with the same "tp"
coordinate form a data-parallel group. Ranks of one tensor-parallel group read the same batches;
``data_rank = r // tp`` is the shard of the data a rank reads, among ``dp`` shards.
"""
from __future__ import annotations

from ..dist.data_layout import DataLayout


def check_tp_size(tp_size: int, world_size: int) -> None:
    """``tp_size`` must divide the number of processes (a ValueError saying how to launch otherwise)."""
    if world_size % tp_size:
        raise ValueError(
            f"tp_size={tp_size} must divide the number of processes, and this run has {world_size}; launch a "
            f"multiple of {tp_size} processes (torchrun --nproc_per_node=...), or pass a tp_size that divides "
            f"{world_size}")


class Grid:
    """The ``(dp, tp)`` device mesh of every rank, and where this rank sits on it."""

    def __init__(self, device_type: str, world_size: int, tp_size: int) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        check_tp_size(tp_size, world_size)
        self.mesh = init_device_mesh(device_type, (world_size // tp_size, tp_size), mesh_dim_names=("dp", "tp"))
        self.dp, self.tp = self.mesh["dp"], self.mesh["tp"]
        self.dp_size, self.tp_size = self.dp.size(), self.tp.size()
        self.data = DataLayout(self.dp.get_local_rank(), self.dp_size, self.dp.get_group(),
                               replica=self.tp.get_local_rank() != 0)

    def describe(self) -> str:
        return f"{self.dp_size} x {self.tp_size} (dp x tp)"

    def __repr__(self) -> str:
        return f"Grid({self.describe()})"

