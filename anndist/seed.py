"""Deterministic, rank-aware seeding and the RNG state a checkpoint must carry.

``seed_everything(S)`` before building the model makes the initial weights reproducible. Once the
weights are in sync the Trainer reseeds each rank with ``S + rank`` so dropout and augmentation
differ across ranks, and DataLoader workers get seeds derived from ``(S, rank, epoch)``.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .dist.data_layout import DataLayout, owners

_MAX_SEED = 2**32 - 1


def check_seed(seed: Any, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__} {seed!r}")
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"{name}={seed} is out of range; use an int in [0, 2**32 - 1]")
    return seed


def seed_everything(seed: int) -> int:
    """Seed Python's ``random``, NumPy and torch (CPU and every CUDA device); return the seed."""
    check_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return seed


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s own stream (dropout, augmentation in the main process)."""
    return (seed + rank) % (_MAX_SEED + 1)


def loader_seed(seed: int, rank: int, epoch: int) -> int:
    """Base seed of the DataLoader workers of ``rank`` in ``epoch``: distinct per rank and epoch."""
    mixed = np.random.SeedSequence([seed, rank, epoch]).generate_state(1, dtype=np.uint64)[0]
    return int(mixed % (2**63 - 1))


_MASK64 = 2**64 - 1


def micro_batch_seed(seed: int, epoch: int, piece: int) -> int:
    """The seed of the forward of piece ``piece`` of ``epoch``'s global order (``Trainer(global_batch_size=N)``):
    a function of the piece, not of the rank that computes it, so dropout draws the same masks on any
    number of ranks. SplitMix64's finaliser over the three numbers: a few integer operations."""
    x = (seed * 0x9E3779B97F4A7C15 + (epoch + 1) * 0xBF58476D1CE4E5B9 + (piece + 1) * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1  # 63 bits: manual_seed takes them on every device


def reseed_forward(seed: int, device: Any) -> None:
    """Set torch's generator of ``device`` (the CPU's, and a GPU's own) to ``seed``: what dropout draws from."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()].manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU and CUDA), safe for ``weights_only`` loads."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _python_state_to_tensor(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # a CPU run never starts CUDA here
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_python_state_from_tensor(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((
        "MT19937",
        np_state["keys"].numpy().astype(np.uint32),
        np_state["pos"],
        np_state["has_gauss"],
        np_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # The writer may have seen more GPUs (8 on its node, 1 per task here): restore those that exist.
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def _python_state_to_tensor(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_state_from_tensor(state: dict[str, Any]) -> tuple:
    return (state["version"], tuple(int(x) for x in state["internal"].tolist()), state["gauss"])


class RNGState:
    """This rank's RNG streams as a checkpoint entry: each rank saves and restores its own.

    The one place a resumed run's streams are set. Creating a DataLoader iterator draws from the
    global torch RNG (a loader without its own generator), so a checkpoint taken mid-epoch holds
    streams that already include that draw: there they are set right after the epoch's iterator is
    created (``iterate``). At an epoch's boundary (or a load outside ``fit``) they are set at load,
    before anything draws. ``train_state`` (loaded before the rank states) tells which case a load is.

    Each rank takes the streams of the saved rank that read its data shard (``data``, the strategy's
    ``DataLayout``; the first rank of a tensor-parallel group, whose ranks draw the same dropout masks,
    so they keep one stream): on the layout that wrote it, its own; a shard that did not exist then
    keeps the stream it was seeded with.
    """

    def __init__(self, rank: int, train_state: Any, data: DataLayout | None = None) -> None:
        self.rank, self.train_state = rank, train_state
        self.data = data if data is not None else DataLayout(rank)
        self.pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {**rng_state(), **self.data.entry()}

    def load_rank_state_dicts(self, states: list[dict[str, Any]]) -> None:
        self.pending = owners(states).get(self.data.rank)
        if not self.train_state.batch_in_epoch:
            self._apply()

    def iterate(self, loader: Any) -> Any:
        """``iter(loader)`` for an epoch, and the streams of a mid-epoch checkpoint set right after it."""
        batches = iter(loader)
        self._apply()
        return batches

    def _apply(self) -> None:
        if self.pending is not None:
            set_rng_state(self.pending)
            self.pending = None
