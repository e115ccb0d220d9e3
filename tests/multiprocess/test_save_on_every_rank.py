"""save_checkpoint() called on rank 0 only is named within seconds, not after dist_timeout."""
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Trainer
from anndist.checkpoint import protocol
from support import make_dataset, make_model, run_spawn


def _rank0_only(rank, world_size, folder):
    protocol.ARRIVAL_TIMEOUT = 3.0
    model = make_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), progress_bar=False)
    trainer.fit(DataLoader(make_dataset(32), batch_size=4), num_epochs=1)
    trainer.save_checkpoint(f"{folder}/every.ckpt")  # the right way first: no false alarm
    if not trainer.is_main_process:
        return None
    started = time.monotonic()
    try:
        trainer.save_checkpoint(f"{folder}/rank0.ckpt")
    except Exception as exc:  # noqa: BLE001 (the test inspects whatever comes)
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - started}
    return {"error": None, "seconds": time.monotonic() - started}


def test_save_on_rank0_only_is_named_within_seconds(tmp_path):
    result = run_spawn(_rank0_only, 2, str(tmp_path))[0]
    assert result["error"] is not None and result["seconds"] < 20
    assert "save_checkpoint() was called on rank(s) [0] only" in result["error"]
    assert "outside `if trainer.is_main_process:`" in result["error"]
    assert (tmp_path / "every.ckpt").exists() and not (tmp_path / "rank0.ckpt").exists()
