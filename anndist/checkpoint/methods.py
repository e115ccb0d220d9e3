"""The Trainer's checkpoint methods: what a run saves (its ``RunState``), and saving and loading it.

A mixin of ``Trainer``, kept here beside the code it calls: it reads the Trainer's parts (``module``,
``optimizer``, ``precision``, ``state``, ``callbacks``, ``scheduler``, ``epoch_sums``, ``strategy``) and
hands them to ``CheckpointManager`` (``self.checkpoints``) as objects with ``state_dict()``; the rest of
``checkpoint/`` never sees the Trainer.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..data.loaders import LoaderState
from ..seed import RNGState
from .manager import check_window_closed
from .protocol import RunState
from .states import ModelState, whole_states


class CheckpointMethods:
    """``save_checkpoint``, ``save_in_dir``, ``load_checkpoint``, ``state_dict``, ``load_state_dict``."""

    def _make_run_state(self) -> RunState:
        self._loader_state = LoaderState(self.rank, self.world_size, self.state, self.strategy.data)
        self._rng_state = RNGState(self.rank, self.state, self.strategy.data)
        shared = {"model": ModelState(self.module), "optimizer": self.optimizer, "scaler": self.precision,
                  "train_state": self.state, "callbacks": self.callbacks}
        if self.scheduler is not None:
            shared["scheduler"] = self.scheduler
        own = {"rng": self._rng_state, "epoch_sums": self.epoch_sums, "loader": self._loader_state}
        sharded = self.strategy.checkpoint_states(shared, self.optimizer)  # may take model and optimizer out
        return RunState(shared, own, ready_to_save=lambda: check_window_closed(self.module, self.state),
                        sharded=sharded)

    def save_checkpoint(self, path: str | os.PathLike, **metadata: Any) -> Path:
        """Save everything needed to continue this run exactly to ``path``; call it on **every rank**.

        Rank 0 alone writes (atomically: a crash leaves the old file or the new one), after gathering
        every rank's RNG state; all ranks return once the file is complete. ``metadata`` (numbers,
        strings, tensors, lists, dicts) comes back from ``load_checkpoint``. See docs/checkpoints.md.
        """
        return self.checkpoints.save(path, metadata)

    def save_in_dir(self, dirpath: str | os.PathLike, name: str | None = None, **metadata: Any) -> Path:
        """Save to ``dirpath/name.ckpt`` (``step-<global step>.ckpt`` when name is None) and point ``latest`` at it."""
        return self.checkpoints.save_in_dir(dirpath, name, metadata)

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore a checkpoint on **every rank** (each rank its own RNG streams); return its metadata."""
        return self.checkpoints.load(path)

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, scheduler, scaler, train_state, callbacks (no RNG); whole even where the strategy
        shards (then a collective, gathered to rank 0: see checkpoint/states.py ``whole_states``)."""
        return {name: obj.state_dict() for name, obj in whole_states(self.run_state).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """What ``state_dict()`` gave, back into this Trainer (a collective where the strategy shards)."""
        for name, obj in whole_states(self.run_state).items():
            if name in state:
                obj.load_state_dict(state[name])
