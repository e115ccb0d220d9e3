"""The weak items of issue 26: errors that came late, named nothing, or pointed the wrong way.

A sharded save on a full disk (asynchronous or not) is an ``OSError(ENOSPC)`` naming the checkpoint,
through the callback error wrapping, the previous checkpoint kept; a rank whose stream is empty is
named (in ``test_lost_two_ranks.py``, which has the spawn); ``eval_every_n_steps`` past the run's end is said at the start; a monitor that needs a val
loader, and a ``latest`` that is a folder, fail at ``fit``'s start; a NaN from a micro-batch whose
items were all ignored says so; a collective timeout names the rank that never arrived.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from anndist import (CallbackError, EarlyStopping, ModelCheckpoint, NonFiniteLossError, Trainer,
                     latest_checkpoint)
from support import ROOT, child_env, make_dataset, make_model
from support.exit_trials import free_port


def _trainer(model=None, callbacks=(), **options):
    model = model if model is not None else make_model()
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), seed=0,
                   callbacks=list(callbacks), progress_bar=False, handle_signals=False, **options)


def _loader(n=64):
    return DataLoader(make_dataset(n), batch_size=8, shuffle=True)


# ---------------------------------------------------------------- a full disk under a sharded save
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only), unmounted after the test."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a full disk needs a small tmpfs, which needs root: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.parametrize("options", [{"async_checkpoint": True}, {"strategy": "fsdp"}], ids=["async", "sync-fsdp"])
def test_a_sharded_save_on_a_full_disk_is_an_oserror_naming_it_and_keeps_the_last_one(small_disk, options):
    """Each save is ~600 kB of weights: the first fits in the 1 MiB disk, the second does not."""
    model = nn.Linear(384, 384)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), nn.MSELoss(), progress_bar=False,
                      handle_signals=False, checkpoint_dir=small_disk,
                      callbacks=[ModelCheckpoint(every_n_steps=1, every_n_epochs=None, keep_last=1)], **options)
    data = torch.utils.data.TensorDataset(torch.randn(32, 384), torch.randn(32, 384))
    with pytest.raises(CallbackError) as info:
        trainer.fit(DataLoader(data, batch_size=8), num_epochs=1)
    trainer.close()
    cause = info.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC, repr(cause)
    assert f"ModelCheckpoint.on_batch_end raised OSError: [Errno {errno.ENOSPC}] no space left on device writing " \
           f"{small_disk / 'step-000000002.ckpt'}" in str(info.value)
    kept = latest_checkpoint(small_disk)
    assert kept is not None and kept.name == "step-000000001.ckpt"
    fresh = nn.Linear(384, 384)
    Trainer(fresh, torch.optim.SGD(fresh.parameters(), lr=0.01), nn.MSELoss(), handle_signals=False,
            **options).load_checkpoint(kept)  # loads: nothing lost


# ---------------------------------------------------------------- said at fit's start
def test_eval_every_n_steps_past_the_end_of_the_run_is_said_at_the_start(warnings):
    val = DataLoader(make_dataset(16, seed=1), batch_size=8)
    _trainer().fit(_loader(), num_epochs=2, val_loader=val, eval_every_n_steps=17)  # 8 steps per epoch: 16
    assert any("eval_every_n_steps=17 is more than the 16 optimizer steps this fit() trains to: it will never "
               "evaluate" in w for w in warnings), warnings
    warnings.clear()
    _trainer().fit(_loader(), max_steps=5, val_loader=val, eval_every_n_steps=5)
    assert not [w for w in warnings if "eval_every_n_steps" in w]


@pytest.mark.parametrize("make", [lambda: EarlyStopping("val_loss"), lambda: ModelCheckpoint("unused", monitor="val_loss")],
                         ids=["EarlyStopping", "ModelCheckpoint"])
def test_a_monitor_that_needs_a_val_loader_is_an_error_at_the_start(make):
    callback = make()
    trainer = _trainer(callbacks=[callback])
    with pytest.raises(CallbackError, match=rf"{type(callback).__name__}.on_train_begin raised ValueError: "
                                            rf"{type(callback).__name__}\(monitor='val_loss'\) needs validation metrics, "
                                            "and fit\\(\\) has no val_loader"):
        trainer.fit(_loader(), num_epochs=2)
    assert trainer.global_step == 0


def test_latest_being_a_folder_fails_the_start_check(tmp_path):
    (tmp_path / "latest").mkdir()
    trainer = _trainer(checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=rf"checkpoint_dir='{tmp_path}' cannot hold checkpoints: its pointer "
                                         rf"{tmp_path / 'latest'} is a folder"):
        trainer.fit(_loader(), num_epochs=1)
    assert trainer.global_step == 0


# ---------------------------------------------------------------- a NaN that is not a divergence
def test_a_nan_from_a_micro_batch_whose_items_are_all_ignored_is_said_so():
    def compute_loss(model, batch):
        inputs, targets = batch  # every label ignored: cross_entropy's mean is 0/0, NaN
        return F.cross_entropy(model(inputs), targets, ignore_index=-100), int((targets != -100).sum())

    x, y = make_dataset(32).tensors
    y = y.clone()
    y[8:16] = -100  # the second micro-batch of the first window (K=2)
    model = make_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), compute_loss=compute_loss,
                      gradient_accumulation_steps=2, progress_bar=False, handle_signals=False)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8), num_epochs=1)
    message = str(info.value)
    assert message.startswith("NaN loss from micro-batch(es) whose compute_loss gave num_items=0 (every item ignored) "
                              "(rank 0: micro-batch(es) [1] of the window) at optimizer step 1"), message
    assert "learning rate" not in message


# ---------------------------------------------------------------- a stuck rank, without the watchdog
def test_a_collective_timeout_names_the_rank_that_never_arrived(tmp_path):
    """Rank 1 sleeps in a callback; rank 0's collective times out (dist_timeout=5): its error names rank 1."""
    port, logs = str(free_port()), [tmp_path / f"rank{r}.txt" for r in (0, 1)]
    env = {r: child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}") for r in (0, 1)}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests/support/scripts/stuck_rank.py")], cwd=ROOT, env=env[r],
                              stdout=subprocess.DEVNULL, stderr=open(logs[r], "w")) for r in (0, 1)]
    try:
        code = procs[0].wait(timeout=120)
        ended = time.time()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    out = logs[0].read_text()
    assert code != 0 and "RuntimeError: a collective timed out after dist_timeout=5 s: rank(s) [1] never arrived" \
        in out, out[-3000:]
    stuck = float(logs[1].read_text().split("stuck at ")[1].split()[0])
    # dist_timeout, then at most GRACE_S (5 s here: no more than dist_timeout) for the other ranks' posts
    assert ended - stuck < 5 + 5 + 20, ended - stuck
