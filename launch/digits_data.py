"""The examples' data: scikit-learn's bundled handwritten digits, 1797 images of 8x8 pixels (no download).

One split for every example, so their numbers compare: 1437 training and 360 validation images,
stratified, pixels scaled to [0, 1]. ``images=True`` gives ``[1, 8, 8]`` tensors for a CNN,
otherwise flat vectors of 64.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from anndist.optional import require

NUM_CLASSES = 10


def digits_datasets(seed: int = 0, images: bool = False) -> tuple[TensorDataset, TensorDataset]:
    """(train, validation) datasets of (pixels, label)."""
    datasets = require("sklearn.datasets", "the digits data")
    model_selection = require("sklearn.model_selection", "the digits data")
    features, labels = datasets.load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = model_selection.train_test_split(
        features / 16.0, labels, test_size=0.2, random_state=seed, stratify=labels)
    shape = (-1, 1, 8, 8) if images else (-1, 64)

    def as_dataset(x, y) -> TensorDataset:
        return TensorDataset(torch.tensor(x, dtype=torch.float32).reshape(shape), torch.tensor(y))

    return as_dataset(x_train, y_train), as_dataset(x_val, y_val)


def digits_loaders(batch_size: int, seed: int = 0, images: bool = False) -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader of ``batch_size`` per process, validation loader of 256.

    Plain loaders: the Trainer shards both across ranks (each rank reads its share of the training
    set, and evaluation counts every validation image once), so the script is the same for 1 or N.
    """
    train_set, val_set = digits_datasets(seed, images)
    return DataLoader(train_set, batch_size=batch_size, shuffle=True), DataLoader(val_set, batch_size=256)
