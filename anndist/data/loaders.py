"""The loaders the Trainer actually reads (the user's, rebuilt per rank where that is safe), and
the train loader's position in a checkpoint.

Train loaders with a stock sampler are rebuilt once with the resumable distributed sampler; eval
loaders with an unpadded shard sampler (one copy per user loader, kept while the user's loader
lives). Anything else is read as given. See ``sampler.py`` for the samplers.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Iterable

from torch.utils.data import DataLoader

from ..dist.data_layout import DataLayout, same_layout
from .global_batch import GlobalBatchSampler
from .sampler import ResumableDistributedSampler, is_rebuildable, shard_eval_loader, shard_train_loader

logger = logging.getLogger(__name__)


class RankLoaders:
    def __init__(self, world_size: int, rank: int, seed: int, rebuild_train: bool, rebuild_eval: bool,
                 global_batch: int | None = None) -> None:
        self.world_size, self.rank, self.seed, self.global_batch = world_size, rank, seed, global_batch
        self.rebuild_train, self.rebuild_eval = rebuild_train, rebuild_eval
        self._train_source: Iterable | None = None  # the user's loader behind self._train
        self._train: Iterable | None = None
        self._eval: "weakref.WeakKeyDictionary[Any, DataLoader]" = weakref.WeakKeyDictionary()

    def train(self, loader: Iterable) -> Iterable:
        if not (isinstance(loader, DataLoader) and self.rebuild_train and is_rebuildable(loader)):
            return loader
        if self._train_source is not loader:
            self._train_source = loader
            self._train = shard_train_loader(loader, self.world_size, self.rank, self.seed, self.global_batch)
        return self._train

    def eval(self, loader: Iterable) -> Iterable:
        if not (isinstance(loader, DataLoader) and self.rebuild_eval and is_rebuildable(loader)):
            return loader
        if loader not in self._eval:
            self._eval[loader] = shard_eval_loader(loader, self.world_size, self.rank)
        return self._eval[loader]


def is_stateful(loader: Any) -> bool:
    """A loader that saves and restores its own position (torchdata's ``StatefulDataLoader``)."""
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def resumes_by_index(loader: Any) -> bool:
    """A loader anndist rebuilt: it starts an epoch part-way by skipping sample indices."""
    return isinstance(loader, DataLoader) and (isinstance(loader.sampler, ResumableDistributedSampler)
                                               or isinstance(loader.batch_sampler, GlobalBatchSampler))


class LoaderState:
    """The train loader's own position as a checkpoint entry, each rank its own.

    Only a stateful loader's state is kept, and only mid-epoch: at an epoch's end the loader simply
    starts its next epoch. ``restored`` says whether the last load put the loader mid-epoch; a load
    written by another layout of the ranks (``data``) does not (the epoch then starts over).
    """

    def __init__(self, rank: int, world_size: int, state: Any, data: DataLayout | None = None) -> None:
        self.rank, self.world_size, self.train_state = rank, world_size, state
        self.data = data if data is not None else DataLayout(rank, world_size)
        self.loader: Any = None
        self.restored = False

    def attach(self, loader: Any) -> None:
        self.loader = loader if is_stateful(loader) and not resumes_by_index(loader) else None
        self.restored = False

    def state_dict(self) -> dict[str, Any]:
        mid_epoch = not self.train_state.epoch_done and self.train_state.batch_in_epoch > 0
        if self.loader is None or not mid_epoch:
            return {}
        return {"loader": self.loader.state_dict(), **self.data.entry()}

    def load_rank_state_dicts(self, states: list[dict[str, Any]]) -> None:
        self.restored = False
        if (self.loader is None or not same_layout(states, self.world_size, self.data)
                or "loader" not in states[self.rank]):
            return
        self.loader.load_state_dict(states[self.rank]["loader"])
        self.restored = True


def start_position(loader: Any, state: Any, loader_state: LoaderState) -> int:
    """Micro-batches of ``state``'s epoch already trained; 0, with a warning, when the loader cannot
    start an epoch part-way (the epoch is then repeated from its start)."""
    skip = state.batch_in_epoch
    if skip and not (resumes_by_index(loader) or loader_state.restored):
        logger.warning(
            "the train loader (%s) cannot start an epoch part-way, so epoch %d is repeated from its start: "
            "%d micro-batch(es) per rank are trained again. Loaders that resume exactly: a DataLoader anndist "
            "rebuilds (stock sampler) or one with state_dict()/load_state_dict() (torchdata's StatefulDataLoader)",
            type(loader).__name__, state.epoch, skip)
        state.batch_in_epoch = skip = 0
    loader_state.restored = False
    return skip
