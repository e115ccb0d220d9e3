"""Checkpoint files and ModelCheckpoint in one process: atomic writes, contents, errors, latest, pruning."""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
import torch

from anndist import Callback, CallbackError, CheckpointError, ModelCheckpoint, Trainer, latest_checkpoint, save_in_dir
from anndist.checkpoint import file as file_module
from anndist.checkpoint.file import FORMAT, atomic_link
from support import flat_params, make_model
from support.scripts.ckpt_train import EPOCHS, make_run


def _trained(epochs: int = 1, callbacks=(), **options):
    trainer, train_loader, val_loader = make_run(list(callbacks), **options)
    history = trainer.fit(train_loader, epochs, val_loader=val_loader)
    return trainer, history


def test_write_is_temp_fsync_replace_fsync_folder(tmp_path, monkeypatch):
    trainer, _ = _trained()
    target = tmp_path / "run.ckpt"
    target.write_bytes(b"previous")
    events = []
    real_fsync, real_replace, real_save = os.fsync, os.replace, torch.save

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    def save(obj, f, *args, **kwargs):
        assert target.read_bytes() == b"previous", "the destination changed before the write was complete"
        events.append(("write", f.name))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(torch, "save", save)
    trainer.save_checkpoint(target)
    temp = events[0][1]
    assert Path(temp).parent == tmp_path and Path(temp).name.startswith(".run.ckpt.") and temp.endswith(".tmp")
    assert events == [("write", temp), ("fsync", temp), ("replace", temp, str(target)), ("fsync", str(tmp_path))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]


class FullDisk:
    """A file with ``room`` bytes left on its disk: a write past that fails with ENOSPC, as the kernel's does."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_a_full_disk_is_named_keeps_the_previous_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch):
    trainer, _ = _trained()
    target = trainer.save_checkpoint(tmp_path / "run.ckpt")
    before = target.read_bytes()
    # torch.save writes through the file object; the disk fills up after 2000 bytes.
    monkeypatch.setattr(file_module, "open", lambda path, mode: FullDisk(open(path, mode), 2000), raising=False)
    with pytest.raises(OSError, match=f"no space left on device writing {target}") as info:
        trainer.save_checkpoint(target)
    assert info.value.errno == errno.ENOSPC and "unexpected pos" not in str(info.value)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]


def test_checkpoint_holds_the_whole_run_and_loads_weights_only(tmp_path):
    trainer, _ = _trained()
    trainer.save_checkpoint(tmp_path / "a.ckpt", note="hello", lr=[0.1, 0.2], tensor=torch.ones(2))
    payload = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert payload["format"] == FORMAT and payload["format_version"] == 2
    assert payload["versions"] == {"anndist": "0.1.0", "torch": str(torch.__version__)}
    state = payload["states"]
    assert set(state) == {"model", "optimizer", "scheduler", "scaler", "train_state", "callbacks"}
    assert state["train_state"] == {"epoch": 1, "global_step": 13, "batch_in_epoch": 0, "world_size": 1, "seed": 7,
                                    "gradient_accumulation_steps": 2, "global_batch_size": None,
                                    "history": trainer.history}
    assert state["scheduler"]["last_epoch"] == 13 and state["optimizer"]["state"]
    (rank,) = payload["ranks"]
    assert set(rank["rng"]) >= {"python", "numpy", "torch"} and rank["epoch_sums"]["items"] == 100
    assert payload["metadata"]["note"] == "hello" and torch.equal(payload["metadata"]["tensor"], torch.ones(2))
    # A fresh Trainer gets it all back, and the metadata.
    fresh, _, _ = make_run([])
    metadata = fresh.load_checkpoint(tmp_path / "a.ckpt")
    assert metadata["lr"] == [0.1, 0.2]
    assert torch.equal(flat_params(fresh.module), flat_params(trainer.module))
    assert (fresh.epoch, fresh.global_step, fresh.history) == (1, 13, trainer.history)
    assert fresh.scheduler.last_epoch == 13


class Opaque:
    """An object that torch.load(weights_only=True) refuses."""


class Shell:
    """Unpickling it would run a shell command; torch.load(weights_only=True) blocks os.system."""

    def __reduce__(self):
        return os.system, ("echo unpickled",)


class Stateful(Callback):
    def state_dict(self):
        return {"thing": Opaque()}


def test_unsafe_state_is_refused_before_anything_is_published(tmp_path):
    trainer, _ = _trained()
    with pytest.raises(TypeError, match=r"metadata 'extra'\['k'\] is a Opaque"):
        trainer.save_checkpoint(tmp_path / "a.ckpt", extra={"k": Opaque()})
    trainer.callbacks.append(Stateful())
    with pytest.raises(TypeError, match=r"weights_only=True\) refuses: .*Opaque"):
        trainer.save_checkpoint(tmp_path / "a.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_load_errors_name_the_file_and_the_problem(tmp_path):
    trainer, _ = _trained()
    good = trainer.save_checkpoint(tmp_path / "good.ckpt")
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "weights.pt"
    torch.save(trainer.module.state_dict(), foreign)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"format": FORMAT, "obj": Opaque()}, pickled)
    shell = tmp_path / "shell.ckpt"
    torch.save({"format": FORMAT, "obj": Shell()}, shell)
    damaged = tmp_path / "damaged.ckpt"
    data = bytearray(good.read_bytes())
    start = data.find(b"data.pkl") + 60  # inside the pickle: the archive stays whole
    data[start:start + 30] = b"x" * 30
    damaged.write_bytes(bytes(data))
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    fresh, _, _ = make_run([])
    cases = [
        (tmp_path / "missing.ckpt", FileNotFoundError, "does not exist"),
        (torn, CheckpointError, "truncated"),
        (text, CheckpointError, "truncated or not a torch.save file"),
        (foreign, CheckpointError, "not an anndist checkpoint"),
        (pickled, CheckpointError,
         rf"refused: .* does not load the global {re.escape(__name__)}.Opaque \(not an allowed"),
        (shell, CheckpointError, r"refused: .* does not load the global posix.system \(its module posix is blocked"),
        (damaged, CheckpointError, "cannot be read, it is damaged"),
        (tmp_path, IsADirectoryError, "is a folder"),
    ]
    for path, error, words in cases:
        with pytest.raises(error, match=words) as info:
            fresh.load_checkpoint(path)
        assert str(path) in str(info.value) and "weights_only=False" not in str(info.value)
    assert fresh.global_step == 0  # nothing half-loaded
    narrow = make_model(hidden=8)
    other = Trainer(narrow, torch.optim.AdamW(narrow.parameters()), torch.nn.CrossEntropyLoss(), seed=7)
    with pytest.raises(CheckpointError, match=f"checkpoint {good} does not fit this Trainer's model"):
        other.load_checkpoint(good)


def test_save_in_the_middle_of_an_accumulation_window_is_refused(tmp_path):
    class SaveMidWindow(Callback):
        def on_batch_end(self, batch_idx, trainer, logs=None):
            if not logs["ends_window"]:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    with pytest.raises(CallbackError, match="middle of an accumulation window"):
        _trained(callbacks=[SaveMidWindow()])
    assert list(tmp_path.iterdir()) == []


def test_resume_at_the_edges_of_an_epoch_is_exact(tmp_path):
    """Saved after the epoch's last (short) window, at epoch end, and through best.ckpt (a hard link)."""
    at_last_window = ModelCheckpoint(tmp_path / "steps", every_n_steps=13, every_n_epochs=None, keep_last=None)
    at_epoch_end = ModelCheckpoint(tmp_path / "epochs", monitor="val_loss", keep_last=None)
    straight, history = _trained(EPOCHS, [at_last_window, at_epoch_end])
    assert at_epoch_end.best_step is not None
    best = tmp_path / "epochs" / "best.ckpt"
    assert best.stat().st_ino == (tmp_path / "epochs" / f"step-{at_epoch_end.best_step:09d}.ckpt").stat().st_ino
    for source in (tmp_path / "steps" / "step-000000013.ckpt", tmp_path / "epochs" / "step-000000026.ckpt", best):
        trainer, train_loader, val_loader = make_run([])
        assert trainer.fit(train_loader, EPOCHS, val_loader=val_loader, resume_from=source) == history, source
        assert torch.equal(flat_params(trainer.module), flat_params(straight.module)), source


def test_model_checkpoint_prunes_points_latest_and_restores_best(tmp_path):
    callback = ModelCheckpoint(tmp_path, every_n_steps=5, keep_last=2, monitor="val_loss")
    _trained(2, [callback])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.ckpt", "latest", "step-000000025.ckpt", "step-000000026.ckpt"]
    assert (tmp_path / "latest").read_text() == "step-000000026.ckpt\n"
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000000026.ckpt"
    again = ModelCheckpoint(tmp_path, every_n_steps=5, keep_last=2, monitor="val_loss")
    trainer, train_loader, val_loader = make_run([again])
    trainer.fit(train_loader, 2, val_loader=val_loader, resume_from="latest")
    assert (again.best_score, again.best_step) == (callback.best_score, callback.best_step)


def test_latest_skips_a_damaged_checkpoint_with_a_warning(tmp_path, warnings):
    stale = tmp_path / ".step-000000099.ckpt.12345.0badc0de.tmp"  # what a writer killed mid-save leaves
    stale.write_bytes(b"half a checkpoint")
    trainer, train_loader, val_loader = make_run([])
    for epochs in (1, 2, 3):
        trainer.fit(train_loader, epochs, val_loader=val_loader)
        save_in_dir(trainer, tmp_path)
    assert not stale.exists()  # the next save_in_dir removes it
    newest = tmp_path / "step-000000039.ckpt"
    assert latest_checkpoint(tmp_path) == newest and not warnings
    newest.write_bytes(newest.read_bytes()[:1000])  # torn by something outside anndist (a copy, a disk)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000000026.ckpt"
    assert any(str(newest) in w and "truncated" in w for w in warnings)
    (tmp_path / "latest").unlink()  # no pointer: the newest whole one by recorded progress
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000000026.ckpt"
    (tmp_path / "latest").write_text("../elsewhere\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000000026.ckpt"
    for path in tmp_path.glob("*.ckpt"):
        path.write_bytes(b"")
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_resume_options_and_their_errors(tmp_path):
    trainer, train_loader, _ = make_run([])
    with pytest.raises(TypeError, match="resume_from must be a path"):
        trainer.fit(train_loader, 1, resume_from=3)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        trainer.fit(train_loader, 1, resume_from="latest")
    trainer, train_loader, _ = make_run([], checkpoint_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=f"no complete checkpoint in {tmp_path}"):
        trainer.fit(train_loader, 1, resume_from="latest")
    with pytest.raises(ValueError, match="auto_resume=True needs checkpoint_dir"):
        make_run([], auto_resume=True)
    with pytest.raises(TypeError, match="checkpoint_dir must be a path"):
        make_run([], checkpoint_dir=3)
    # auto_resume: a first start trains from scratch, a second start resumes, once per Trainer.
    first, train_loader, _ = make_run([], checkpoint_dir=tmp_path, auto_resume=True)
    first.fit(train_loader, 1)
    save_in_dir(first, tmp_path, name="manual", note="x")
    second, train_loader, _ = make_run([], checkpoint_dir=tmp_path, auto_resume=True)
    second.fit(train_loader, 1)
    assert second.global_step == 13 and torch.equal(flat_params(second.module), flat_params(first.module))
    second.fit(train_loader, 2)
    assert second.global_step == 26
    other, train_loader, _ = make_run([], seed=8)
    with pytest.raises(ValueError, match="seed=7 but this Trainer has seed=8; the data order"):
        other.fit(train_loader, 1, resume_from=tmp_path)
    with pytest.raises(ValueError, match="plain file name"):
        save_in_dir(first, tmp_path, name="../x")


def test_model_checkpoint_arguments_are_checked():
    with pytest.raises(ValueError, match="save_best=True needs monitor"):
        ModelCheckpoint("d", save_best=True)
    with pytest.raises(ValueError, match="would never save"):
        ModelCheckpoint("d", every_n_epochs=None)
    with pytest.raises(ValueError, match="keep_last=0 must be >= 1"):
        ModelCheckpoint("d", keep_last=0)
    with pytest.raises(TypeError, match="every_n_steps must be an int"):
        ModelCheckpoint("d", every_n_steps=2.5)
    with pytest.raises(ValueError, match="mode='low'"):
        ModelCheckpoint("d", monitor="val_loss", mode="low")
    with pytest.raises(CallbackError, match=r"on_train_begin .*monitor='val_acc'\) is not a metric of an epoch"):
        _trained(1, [ModelCheckpoint("unused", monitor="val_acc")])
    with pytest.raises(CallbackError, match="has no folder"):
        _trained(1, [ModelCheckpoint()])


def test_fp16_scaler_state_comes_back(tmp_path):
    """The GradScaler's state (here its growth tracker: 13 steps without overflow) is part of the run."""
    trainer, _ = _trained(use_amp=True, amp_dtype="fp16")
    scaler = trainer.state_dict()["scaler"]
    assert scaler["_growth_tracker"] == 13 and scaler["scale"] == 2.0**16
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    fresh, _, _ = make_run([], use_amp=True, amp_dtype="fp16")
    assert fresh.state_dict()["scaler"] != scaler
    fresh.load_checkpoint(tmp_path / "a.ckpt")
    assert fresh.state_dict()["scaler"] == scaler


def test_best_is_a_durable_copy_where_hard_links_fail(tmp_path, monkeypatch):
    source = tmp_path / "step-000000001.ckpt"
    source.write_bytes(b"complete checkpoint bytes")

    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    atomic_link(source, tmp_path / "best.ckpt")
    assert (tmp_path / "best.ckpt").read_bytes() == source.read_bytes()
    assert (tmp_path / "best.ckpt").stat().st_ino != source.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "step-000000001.ckpt"]


def test_a_checkpoint_dir_that_cannot_hold_checkpoints_fails_when_fit_starts(tmp_path):
    """Not at the first save, which is often the preemption itself: then all progress would be lost."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for folder, reason in ((a_file / "ckpt", "NotADirectoryError"), ("/sys/anndist-ckpt", "PermissionError")):
        model = make_model()
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                          checkpoint_dir=folder, progress_bar=False)
        with pytest.raises(ValueError, match=f"checkpoint_dir='{folder}' cannot hold checkpoints: {reason}"):
            trainer.fit([(torch.randn(2, 8), torch.tensor([0, 1]))], num_epochs=1)
        assert trainer.global_step == 0  # refused before any training
    model = make_model()
    with pytest.raises(ValueError, match="checkpoint_dir='' is empty"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_dir="")
    writable = tmp_path / "new" / "ckpt"
    model = make_model()
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), checkpoint_dir=writable,
            progress_bar=False).fit([(torch.randn(2, 8), torch.tensor([0, 1]))], num_epochs=1)
    assert writable.is_dir() and list(writable.iterdir()) == []  # created, the probe removed
