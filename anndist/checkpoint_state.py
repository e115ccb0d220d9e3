"""What a checkpoint holds, and how a Trainer gets it back.

The file is one ``torch.save`` dict, loadable with ``torch.load(weights_only=True)``::

    format          "anndist.checkpoint"
    format_version  1
    versions        {"anndist": str, "torch": str}
    trainer         Trainer.state_dict(): model (bare module), optimizer, scheduler, scaler,
                    progress {epoch, global_step, batch_in_epoch, world_size, seed}, history, callbacks
    ranks           one dict per rank, in rank order:
                    {"rng": python/numpy/torch/cuda RNG states, "epoch_loss_sum": float, "epoch_samples": int}
    metadata        the user's keyword arguments to save_checkpoint

``progress.batch_in_epoch`` counts the micro-batches of ``epoch`` each rank has trained; resuming
skips them by index in the sampler. ``epoch_loss_sum``/``epoch_samples`` are the rank's partial sums
of the epoch's train loss, so a resumed epoch reports the same ``train_loss`` as an uninterrupted one.
"""
from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint_file import FORMAT, FORMAT_VERSION, CheckpointError
from .log import get_logger
from .seed import rng_state, set_rng_state

if TYPE_CHECKING:
    from .trainer import Trainer


def rank_state(trainer: "Trainer") -> dict[str, Any]:
    """This rank's own part of a checkpoint: RNG streams and the epoch's partial loss sums."""
    return {
        "rng": rng_state(),
        "epoch_loss_sum": float(trainer.epoch_loss_sum),
        "epoch_samples": int(trainer.epoch_samples),
    }


def build_payload(trainer: "Trainer", ranks: list[dict[str, Any]], metadata: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint dict: the Trainer's state, every rank's state, versions and ``metadata``."""
    from . import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": {"anndist": __version__, "torch": str(torch.__version__)},
        "trainer": trainer.state_dict(),
        "ranks": ranks,
        "metadata": dict(metadata),
    }


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


def restore(trainer: "Trainer", payload: dict[str, Any], source: str) -> dict[str, Any]:
    """Load ``payload`` into ``trainer`` (this rank's RNG included); return the metadata."""
    state = dict(payload["trainer"])
    progress = dict(state["progress"])
    saved_world = int(progress["world_size"])
    _check_seed(trainer, progress.get("seed"), source)
    if saved_world != trainer.world_size:
        progress["batch_in_epoch"] = _rescale_position(trainer, progress, saved_world, source)
    state["progress"] = progress
    try:
        trainer.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {source} does not fit this Trainer's model/optimizer: {exc}") from exc
    _restore_rank(trainer, payload["ranks"], saved_world)
    _warn_versions(trainer, payload.get("versions", {}), source)
    return dict(payload.get("metadata", {}))


def _check_seed(trainer: "Trainer", saved_seed: Any, source: str) -> None:
    if saved_seed != trainer.config.seed:
        raise ValueError(
            f"checkpoint {source} was trained with seed={saved_seed!r} but this Trainer has "
            f"seed={trainer.config.seed!r}; the data order depends on the seed, so pass seed={saved_seed!r} to resume")


def _rescale_position(trainer: "Trainer", progress: dict[str, Any], saved_world: int, source: str) -> int:
    """Per-rank batches already trained, for this world size: the same number of samples seen.

    With the same per-rank batch size, ``batch_in_epoch * saved_world`` batches of the epoch's global
    order were consumed; the sampler's order does not depend on the world size, so every new rank
    starts at the same global position.
    """
    consumed = int(progress["batch_in_epoch"]) * saved_world
    batches, leftover = divmod(consumed, trainer.world_size)
    logger = get_logger(trainer.rank)
    logger.warning(
        "checkpoint %s was written by %d rank(s), resuming on %d: model, optimizer and position (%d "
        "batches of epoch %d consumed over all ranks) carry over; per-rank RNG streams, the global batch "
        "per step and the sampler's padding differ, so the run does not continue bit for bit",
        source, saved_world, trainer.world_size, consumed, progress["epoch"])
    if leftover:
        logger.warning("%d batch(es) of epoch %d cannot be split over %d ranks and will be trained again",
                       leftover, progress["epoch"], trainer.world_size)
    return batches


def _restore_rank(trainer: "Trainer", ranks: list[dict[str, Any]], saved_world: int) -> None:
    if trainer.world_size == saved_world:
        mine = ranks[trainer.rank]
        trainer.epoch_loss_sum, trainer.epoch_samples = mine["epoch_loss_sum"], mine["epoch_samples"]
    else:  # only the epoch's global sums matter: rank 0 carries them
        first = trainer.rank == 0
        trainer.epoch_loss_sum = sum(r["epoch_loss_sum"] for r in ranks) if first else 0.0
        trainer.epoch_samples = sum(r["epoch_samples"] for r in ranks) if first else 0
    if trainer.rank < len(ranks):
        set_rng_state(ranks[trainer.rank]["rng"])
    # A rank that did not exist keeps the stream the Trainer seeded it with (seed + rank).


def _warn_versions(trainer: "Trainer", versions: dict[str, Any], source: str) -> None:
    from . import __version__

    saved_torch = str(versions.get("torch", "?"))
    if saved_torch.split("+")[0] != torch.__version__.split("+")[0]:
        get_logger(trainer.rank).warning(
            "checkpoint %s was written with torch %s, this is torch %s: random streams and kernels may "
            "differ, so the resumed run may not match an uninterrupted one bit for bit",
            source, saved_torch, torch.__version__)
    if versions.get("anndist") not in (None, __version__):
        get_logger(trainer.rank).info("checkpoint %s was written by anndist %s (this is %s)",
                                      source, versions.get("anndist"), __version__)
