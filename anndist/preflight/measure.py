"""The pre-flight measurements, each a collective step that every rank runs at the same point.

compute: ``rounds`` rounds of ``round_s`` seconds of square matmuls, each round started by a
barrier, so every rank measures in the same stretch of time and load that comes and goes hits them
alike; per round its GFLOP/s and the share of the wall time the process had a CPU (a rank sharing
its core with another busy process gets about half). links: rank 0 plays ping-pong with one rank
per node (the node's lowest), small messages for latency and large ones for bandwidth; the others
wait at the closing barrier. all-reduce: the whole job, tiny and large. Timings on a GPU
synchronise the device before reading the clock.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from ..dist import collectives

LATENCY_TRIPS = 20
BANDWIDTH_TRIPS = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute_speed(device: torch.device, rounds: int, round_s: float) -> dict[str, list[float]]:
    """Per round: GFLOP/s of fp32 matmuls, and the CPU time / wall time of this process."""
    n = 4096 if device.type == "cuda" else 256
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    per_sync = 2 if device.type == "cuda" else 1  # a sync per ~5 ms on a large GPU
    flops = 2.0 * n ** 3 * per_sync
    gflops, cpu_share = [], []
    for round_ in range(rounds + 1):  # round 0 warms up (allocation, clocks, caches) and is not kept
        collectives.barrier()
        _sync(device)
        count, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
        while True:
            for _ in range(per_sync):
                torch.mm(a, b, out=out)
            _sync(device)
            count += 1
            wall = time.perf_counter() - wall0
            if wall >= round_s:
                break
        if round_:
            gflops.append(count * flops / wall / 1e9)
            cpu_share.append((time.process_time() - cpu0) / wall)
    return {"gflops": gflops, "cpu_share": cpu_share}


def link_speeds(peers: list[int], device: torch.device, nbytes: int) -> dict[int, dict[str, float]]:
    """Rank 0's ping-pong with each rank in ``peers``: ``{peer: {"latency_us", "mb_s"}}`` on rank 0
    ({} elsewhere). Every rank calls it with the same ``peers``; a barrier closes it."""
    me, found = collectives.rank(), {}
    small = torch.zeros(1, device=device)
    big = torch.zeros(max(1, nbytes // 4), device=device)
    for peer in peers:
        if me == 0:
            latency = statistics.median(_round_trips(small, peer, LATENCY_TRIPS, device)) / 2
            best = min(_round_trips(big, peer, BANDWIDTH_TRIPS, device))
            found[peer] = {"latency_us": latency * 1e6, "mb_s": 2 * big.numel() * 4 / best / 1e6}
        elif me == peer:
            for tensor, trips in ((small, LATENCY_TRIPS), (big, BANDWIDTH_TRIPS)):
                for _ in range(trips + 1):
                    dist.recv(tensor, src=0)
                    dist.send(tensor, dst=0)
            _sync(device)
    collectives.barrier()
    return found


def _round_trips(tensor: torch.Tensor, peer: int, trips: int, device: torch.device) -> list[float]:
    times = []
    for trip in range(trips + 1):  # the first trip sets the connection up and is not kept
        started = time.perf_counter()
        dist.send(tensor, dst=peer)
        dist.recv(tensor, src=peer)
        _sync(device)
        if trip:
            times.append(time.perf_counter() - started)
    return times


def all_reduce_speed(device: torch.device, nbytes: int) -> dict[str, float] | None:
    """The whole job's all-reduce: median latency of a 4-byte one (us) and bus bandwidth of a large
    one (GB/s, ``2 (n - 1) / n`` bytes per byte reduced, the figure nccl-tests print); None alone."""
    n = collectives.world_size()
    if n < 2:
        return None
    small, big = torch.zeros(1, device=device), torch.zeros(max(1, nbytes // 4), device=device)
    latency = statistics.median(_timed_all_reduces(small, LATENCY_TRIPS, device))
    best = min(_timed_all_reduces(big, BANDWIDTH_TRIPS, device))
    return {"latency_us": latency * 1e6, "bus_gb_s": 2 * (n - 1) / n * big.numel() * 4 / best / 1e9,
            "bytes": big.numel() * 4}


def _timed_all_reduces(tensor: torch.Tensor, count: int, device: torch.device) -> list[float]:
    times = []
    for i in range(count + 1):
        started = time.perf_counter()
        dist.all_reduce(tensor)
        _sync(device)
        if i:
            times.append(time.perf_counter() - started)
    return times


def node_leaders(hosts: list[str]) -> list[int]:
    """The rank 0 plays ping-pong with: each other node's lowest rank, and on rank 0's node its next
    rank (the node's own link, shared memory or NVLink), when there is one."""
    first: dict[str, int] = {}
    for rank, host in enumerate(hosts):
        first.setdefault(host, rank)
    leaders = [r for h, r in first.items() if h != hosts[0]]
    local = next((r for r, h in enumerate(hosts) if r > 0 and h == hosts[0]), None)
    return ([local] if local is not None else []) + leaders


def describe_all_reduce(figures: Any) -> str:
    if not figures:
        return "all-reduce: one rank, nothing to measure"
    return (f"all-reduce over every rank: 4 B in {figures['latency_us']:.0f} us (median of {LATENCY_TRIPS}); "
            f"{figures['bytes'] / 2**20:.0f} MiB at {figures['bus_gb_s']:.2f} GB/s bus bandwidth (best of "
            f"{BANDWIDTH_TRIPS})")
