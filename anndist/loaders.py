"""The loaders the Trainer actually reads: the user's, rebuilt per rank where that is safe.

Train loaders with a stock sampler are rebuilt once with the resumable distributed sampler; eval
loaders with an unpadded shard sampler (one copy per user loader, kept while the user's loader
lives). Anything else is read as given. See ``sampler.py`` for the samplers.
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable

from torch.utils.data import DataLoader

from .sampler import is_rebuildable, shard_eval_loader, shard_train_loader


class RankLoaders:
    def __init__(self, world_size: int, rank: int, seed: int, rebuild_train: bool, rebuild_eval: bool) -> None:
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.rebuild_train, self.rebuild_eval = rebuild_train, rebuild_eval
        self._train_source: Iterable | None = None  # the user's loader behind self._train
        self._train: Iterable | None = None
        self._eval: "weakref.WeakKeyDictionary[Any, DataLoader]" = weakref.WeakKeyDictionary()

    def train(self, loader: Iterable) -> Iterable:
        if not (isinstance(loader, DataLoader) and self.rebuild_train and is_rebuildable(loader)):
            return loader
        if self._train_source is not loader:
            self._train_source = loader
            self._train = shard_train_loader(loader, self.world_size, self.rank, self.seed)
        return self._train

    def eval(self, loader: Iterable) -> Iterable:
        if not (isinstance(loader, DataLoader) and self.rebuild_eval and is_rebuildable(loader)):
            return loader
        if loader not in self._eval:
            self._eval[loader] = shard_eval_loader(loader, self.world_size, self.rank)
        return self._eval[loader]
