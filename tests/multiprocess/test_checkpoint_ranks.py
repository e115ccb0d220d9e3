"""Checkpoints on 2 real gloo ranks (one spawn serves every assertion): who writes, whose RNG, which best."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from anndist import ModelCheckpoint, save_in_dir
from support import run_spawn
from support.scripts.ckpt_train import make_run


def _draws() -> list[float]:
    return [random.random(), float(np.random.rand()), *torch.rand(2).tolist()]


def _ranks(rank: int, world_size: int, root: str) -> dict:
    # Each rank names its own folder: whatever rank 1 wrote would show up in rank1/.
    mine = Path(root) / f"rank{rank}"
    shared = Path(root) / "rank0"
    periodic = ModelCheckpoint(mine / "periodic", every_n_steps=2, keep_last=2, monitor="val_loss")
    trainer, train_loader, val_loader = make_run([periodic])
    trainer.fit(train_loader, 2, val_loader=val_loader)
    save_in_dir(trainer, mine / "dir", note="x")
    trainer.save_checkpoint(mine / "direct" / "run.ckpt")

    # Every rank's RNG is in the file, and each rank gets its own back.
    after_save = _draws()
    _draws()
    trainer.load_checkpoint(shared / "direct" / "run.ckpt")
    after_load = _draws()
    saved = torch.load(shared / "direct" / "run.ckpt", weights_only=True)

    # Best by a metric that (wrongly) differs per rank: rank 0's verdict holds on both ranks.
    best = ModelCheckpoint(mine / "best", every_n_epochs=None, monitor="val_loss")
    best.on_train_begin(trainer)
    best_scores = []
    for epoch, scores in enumerate([(1.0, 5.0), (0.5, 9.0), (0.7, 0.1)]):
        best.on_epoch_end(epoch, trainer, logs={"val_loss": scores[rank]})  # saves on both ranks or neither
        best_scores.append(best.best_score)
    return {"after_save": after_save, "after_load": after_load, "ranks_in_file": len(saved["ranks"]),
            "world_in_file": saved["states"]["train_state"]["world_size"], "best_scores": best_scores}


def test_rank0_alone_writes_and_every_rank_gets_its_own_rng_back(tmp_path):
    results = run_spawn(_ranks, 2, str(tmp_path))
    assert not (tmp_path / "rank1").exists(), sorted(str(p) for p in (tmp_path / "rank1").rglob("*"))
    written = sorted(str(p.relative_to(tmp_path / "rank0")) for p in (tmp_path / "rank0").rglob("*") if p.is_file())
    assert written == ["best/best.ckpt", "best/latest", "dir/latest", "dir/step-000000014.ckpt", "direct/run.ckpt",
                       "periodic/best.ckpt", "periodic/latest", "periodic/step-000000012.ckpt",
                       "periodic/step-000000014.ckpt"]
    for result in results:
        assert result["after_load"] == result["after_save"]
        assert (result["ranks_in_file"], result["world_in_file"]) == (2, 2)
    assert results[0]["after_save"] != results[1]["after_save"]  # two streams, both restored
    assert results[0]["best_scores"] == results[1]["best_scores"] == [1.0, 0.5, 0.5]
