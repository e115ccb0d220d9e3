"""Sharded (DCP) checkpoints under strategy="fsdp": bit-identical resume on 2 ranks (sync and async saves,
through ModelCheckpoint), a 2 -> 1 reshard that trains on, and the consolidation into one file."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Trainer
from anndist.callbacks import Callback, ModelCheckpoint
from models import make_dataset
from spawn_ranks import run_spawn
from test_fsdp import full_weights


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))


def _trainer(async_save: bool, callbacks=()) -> Trainer:
    model = _model()
    return Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), nn.CrossEntropyLoss(), strategy="fsdp",
                   shard_modules=lambda m: isinstance(m, nn.Linear), async_checkpoint=async_save, seed=0,
                   progress_bar=False, handle_signals=False, callbacks=list(callbacks),
                   scheduler=None, gradient_accumulation_steps=2)


def _loader() -> DataLoader:
    return DataLoader(make_dataset(96), batch_size=4, shuffle=True)  # 12 micro-batches per rank per epoch


class StopAt(Callback):
    """Stops the run mid-epoch, as a preemption would (all ranks agree on the step)."""

    def on_batch_end(self, batch_idx, trainer=None, logs=None):
        if trainer.global_step >= 9:
            trainer.stop_training = True


def _resume(rank: int, world_size: int, folder: str, async_save: bool) -> dict:
    straight = _trainer(async_save)
    straight.fit(_loader(), max_steps=14)
    # Saved every 4 steps by ModelCheckpoint (2 kept); stopped at step 9 or 10, mid-epoch (6 steps per epoch).
    stopped = _trainer(async_save, [ModelCheckpoint(folder, every_n_steps=4, every_n_epochs=None, keep_last=2),
                                    StopAt()])
    stopped.fit(_loader(), max_steps=14)
    assert stopped.global_step < 14 and stopped.batch_in_epoch > 0
    stopped.save_in_dir(folder, "stop")
    stopped.close()
    resumed = _trainer(async_save)
    resumed.fit(_loader(), max_steps=14, resume_from=f"{folder}/stop.ckpt")
    return {"straight": full_weights(straight.module), "resumed": full_weights(resumed.module),
            "history": (straight.history, resumed.history), "blocked": stopped.run_state.sharded.last_blocked_s}


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def two_ranks(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp_ckpt")
    return folder, request.param, run_spawn(_resume, 2, str(folder), request.param)


def test_resume_on_two_ranks_is_bit_identical(two_ranks):
    folder, _, ranks = two_ranks
    for out in ranks:
        for name, value in out["straight"].items():
            assert torch.equal(out["resumed"][name], value), name
        assert out["history"][0]["train_loss"] == out["history"][1]["train_loss"]
        assert out["blocked"] >= 0
    written = sorted(p.name for p in folder.iterdir())
    assert written == ["latest", "step-000000004.ckpt", "step-000000008.ckpt", "stop.ckpt"]
    shard_files = sorted(p.name for p in (folder / "stop.ckpt").iterdir())
    assert shard_files == [".metadata", "__0_0.distcp", "__1_0.distcp", "run.ckpt"]
    assert (folder / "latest").read_text().strip() == "stop.ckpt"


def test_two_to_one_reshards_and_trains_on(two_ranks):
    folder, async_save, ranks = two_ranks
    if async_save:
        pytest.skip("one reshard is enough")
    one = _trainer(False)  # this process: one rank, no process group
    one.load_checkpoint(folder / "step-000000008.ckpt")
    assert one.global_step == 8
    loaded = {k: v.clone() for k, v in one.module.state_dict().items()}
    one.fit(_loader(), max_steps=13)  # 2 ranks' position rescaled to 1 rank: mid-epoch, then on
    assert one.global_step == 13
    assert any(not torch.equal(loaded[k], v) for k, v in one.module.state_dict().items())  # it trained on


def test_consolidate_gives_the_full_model(two_ranks, tmp_path):
    from anndist.consolidate import main
    folder, async_save, ranks = two_ranks
    if async_save:
        pytest.skip("once is enough")
    out = tmp_path / "model.pt"
    assert main([str(folder / "step-000000008.ckpt"), str(out)]) == 0
    state = torch.load(out, weights_only=True)
    model = _model()
    model.load_state_dict(state)  # every key, the full shapes
    one = _trainer(False)
    one.load_checkpoint(folder / "step-000000008.ckpt")
    for name, value in one.module.state_dict().items():
        assert torch.equal(state[name], value)
