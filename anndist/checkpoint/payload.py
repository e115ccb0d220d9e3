"""What a checkpoint file holds: one ``torch.save`` dict, loadable with ``torch.load(weights_only=True)``::

    format          "anndist.checkpoint"
    format_version  2
    versions        {"anndist": str, "torch": str}
    states          {name: state_dict()} of the objects that are the same on every rank (rank 0's
                    copy): model, optimizer, scheduler, scaler, train_state, callbacks
    ranks           one {name: state_dict()} per rank, in rank order, of each rank's own objects:
                    rng (python/numpy/torch/cuda streams), epoch_sums (the epoch's partial loss sums)
    metadata        the user's keyword arguments to save_checkpoint

Nothing here knows what the states mean; ``train_state.py`` and ``seed.py`` own their contents.
"""
from __future__ import annotations

import logging
import numbers
from typing import Any

import torch

from ..version import __version__
from .file import FORMAT, FORMAT_VERSION

logger = logging.getLogger(__name__)

PROGRESS = "train_state"  # the state whose global_step/epoch/batch_in_epoch order checkpoints in a folder


def build(states: dict[str, Any], ranks: list[dict[str, Any]], metadata: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint dict from already-collected state dicts."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": {"anndist": __version__, "torch": str(torch.__version__)},
        "states": states,
        "ranks": ranks,
        "metadata": dict(metadata),
    }


def upgrade(payload: dict[str, Any]) -> dict[str, Any]:
    """A format-1 payload (anndist 0.1: ``trainer`` and flat ``ranks`` entries) in today's layout."""
    if payload.get("format_version") != 1:
        return payload
    old = payload["trainer"]
    progress = dict(old["progress"], history=old.get("history", {}))
    states = {"model": old["model"], "optimizer": old["optimizer"], "scaler": old.get("scaler") or {},
              PROGRESS: progress, "callbacks": old.get("callbacks", {})}
    if old.get("scheduler") is not None:
        states["scheduler"] = old["scheduler"]
    ranks = [{"rng": r["rng"], "epoch_sums": {"loss_sum": r["epoch_loss_sum"], "items": r["epoch_samples"]}}
             for r in payload["ranks"]]
    return {**payload, "format_version": FORMAT_VERSION, "states": states, "ranks": ranks}


def progress_key(payload: dict[str, Any]) -> tuple[int, int, int]:
    """``(global_step, epoch, batch_in_epoch)`` of a checkpoint: which of two is further along."""
    progress = payload["states"][PROGRESS]
    return progress["global_step"], progress["epoch"], progress["batch_in_epoch"]


def warn_versions(versions: dict[str, Any], source: str) -> None:
    saved_torch = str(versions.get("torch", "?"))
    if saved_torch.split("+")[0] != torch.__version__.split("+")[0]:
        logger.warning(
            "checkpoint %s was written with torch %s, this is torch %s: random streams and kernels may "
            "differ, so the resumed run may not match an uninterrupted one bit for bit",
            source, saved_torch, torch.__version__)
    if versions.get("anndist") not in (None, __version__):
        logger.info("checkpoint %s was written by anndist %s (this is %s)", source, versions.get("anndist"), __version__)


def check_metadata(metadata: dict[str, Any]) -> None:
    """Raise a TypeError naming the entry when ``metadata`` holds what ``weights_only`` loads refuse."""
    for key, value in metadata.items():
        _check_plain(value, f"metadata {key!r}")


def _check_plain(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, numbers.Number, str, bytes, torch.Tensor)):
        if isinstance(value, numbers.Number) and not isinstance(value, (int, float, complex)):
            raise TypeError(f"{where} is a {type(value).__name__}; convert it to int or float "
                            "(torch.load(weights_only=True) refuses numpy scalars)")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, f"{where} key")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}, which torch.load(weights_only=True) refuses; pass "
        "numbers, strings, tensors, lists or dicts of them")
