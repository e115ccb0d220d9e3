"""Two ranks in one spawn (issue 26): under FSDP, a flipped byte in rank 1's shard is found by rank 1
and every rank falls back together (case 3); EarlyStopping's best weights survive a resume as each
rank's own shard, not rank 0's (case 5); a rank whose stream is empty is named on every rank (weak).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from anndist import Callback, CheckpointError, EarlyStopping, ModelCheckpoint, Trainer
from support import make_dataset, make_model, run_spawn
from support.damage import flip_inside_a_weight
from support.early_stopping import Scripted

SCORES = [5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 2.0, 1.0]  # best at the third evaluation, patience 3 ends at the sixth


class WholeWeights(Callback):
    """The whole model after each epoch (gathered on rank 0: a collective every rank joins)."""

    def __init__(self):
        self.seen = []

    def on_epoch_end(self, epoch, trainer, logs=None):
        self.seen.append(_whole(trainer))


class StopAfter(Callback):
    """Another callback's stop (as a preemption's) at the end of ``epoch``: the latest weights are kept."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, epoch, trainer, logs=None):
        trainer.stop_training = trainer.stop_training or epoch == self.epoch


def _whole(trainer):
    model = trainer.state_dict()["model"]  # collective under FSDP: whole tensors on rank 0, {} elsewhere
    return torch.cat([t.reshape(-1) for t in model.values()]) if model else None


def _trainer(callbacks=(), classes=3, **options):
    model = make_model(dropout=0.2, classes=classes)
    return Trainer(model, torch.optim.AdamW(model.parameters(), lr=0.01), nn.CrossEntropyLoss(), seed=0,
                   strategy="fsdp", callbacks=list(callbacks), progress_bar=False, handle_signals=False, **options)


def _loader(n=128):
    return DataLoader(make_dataset(n), batch_size=8, shuffle=True)  # 128 samples: 8 steps per epoch on 2 ranks


def _damaged_shard_of_rank_1(rank, root):
    """Steps 4 and 8 saved; a byte of rank 1's shard of step 8 flipped; resumed by name, then by auto_resume."""
    folder = f"{root}/ckpt"
    _trainer([ModelCheckpoint(every_n_steps=4, every_n_epochs=None, keep_last=None)], checkpoint_dir=folder).fit(
        _loader(), num_epochs=1)
    full = _trainer()
    full.fit(_loader(), num_epochs=2)
    shard = f"{folder}/step-000000008.ckpt/__1_0.distcp"
    if rank == 0:
        flip_inside_a_weight(Path(folder) / "step-000000008.ckpt", "__1_0.distcp")
    dist.barrier()
    named = None
    try:
        _trainer().fit(_loader(), num_epochs=2, resume_from=f"{folder}/step-000000008.ckpt")
    except CheckpointError as exc:
        named = f"{type(exc).__name__}: {exc}"
    resumed = _trainer(checkpoint_dir=folder, auto_resume=True)
    resumed.fit(_loader(), num_epochs=2)
    return {"named": named, "shard": shard, "resumed": _whole(resumed), "full": _whole(full),
            "step": resumed.global_step}


def _best_weights_across_a_resume(rank, root):
    val = DataLoader(make_dataset(16, seed=1), batch_size=4)
    seen, early = WholeWeights(), EarlyStopping("val_score", patience=3, restore_best_weights=True)
    # 4 classes: every tensor splits evenly over the 2 ranks, so rank 0's shard would load into rank 1 silently
    uninterrupted = _trainer([early, seen], classes=4, metrics={"score": Scripted(SCORES)})
    uninterrupted.fit(_loader(32), num_epochs=20, val_loader=val)
    first = _trainer([EarlyStopping("val_score", patience=3, restore_best_weights=True), StopAfter(epoch=3)],
                     classes=4, metrics={"score": Scripted(SCORES)})
    first.fit(_loader(32), num_epochs=20, val_loader=val)  # preempted after 4 epochs: the best (epoch 2) behind it
    path = first.save_checkpoint(f"{root}/early.ckpt")
    later = EarlyStopping("val_score", patience=3, restore_best_weights=True)
    second = _trainer([later], classes=4, metrics={"score": Scripted(SCORES, start=4)})
    second.fit(_loader(32), num_epochs=20, val_loader=val, resume_from=path)
    return {"best_epoch_weights": seen.seen[2] if rank == 0 else None, "uninterrupted": _whole(uninterrupted),
            "resumed": _whole(second), "stops": (early.stopped_step, later.stopped_step, later.best_step)}


def _empty_stream_on_rank_1(rank):
    batches = [(torch.randn(4, 8), torch.randint(0, 3, (4,))) for _ in range(4)] if rank == 0 else []
    model = make_model()
    try:
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), progress_bar=False,
                handle_signals=False).fit(batches, num_epochs=1)
    except ValueError as exc:
        return str(exc)
    return None


def _scenarios(rank, world_size, root):
    return {"damaged": _damaged_shard_of_rank_1(rank, root), "early": _best_weights_across_a_resume(rank, root),
            "empty": _empty_stream_on_rank_1(rank)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_spawn(_scenarios, 2, str(tmp_path_factory.mktemp("fsdp_ranks")), timeout=280)


def test_a_flipped_byte_in_rank_1s_shard_is_named_on_every_rank_and_both_fall_back(ranks):
    for rank in ranks:
        out = rank["damaged"]
        assert out["named"] is not None and out["named"].startswith("DamagedCheckpointError"), out["named"]
        assert out["shard"] in out["named"] and "fails its CRC-32 check" in out["named"], out["named"]
        assert out["step"] == 16
    assert torch.equal(ranks[0]["damaged"]["resumed"], ranks[0]["damaged"]["full"])  # from step 4, bit for bit


def test_early_stopping_restores_each_ranks_own_best_shard_after_a_resume(ranks):
    early = ranks[0]["early"]
    assert early["stops"] == (12, 12, 6)  # 2 steps per epoch: best at epoch 2, stopped after epoch 5
    assert torch.equal(early["uninterrupted"], early["best_epoch_weights"])
    assert torch.equal(early["resumed"], early["uninterrupted"])  # both ranks got their own shard back


def test_a_rank_whose_stream_is_empty_is_named_on_every_rank(ranks):
    for rank in ranks:
        assert rank["empty"] is not None and rank["empty"].startswith(
            "the train loader of rank(s) [1] yielded no batch at the start of this epoch, while rank(s) [0] had some")
