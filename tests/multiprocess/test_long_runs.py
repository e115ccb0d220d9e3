"""Long runs: steps across epochs with evaluations every N steps, streams whose shards differ between
ranks, stateful and plain loaders preempted and resumed, and loaders that cannot be read twice."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Callback, Trainer
from support import ROOT, child_env, flat_params, make_dataset, make_model, run_spawn, torchrun

STREAM = ROOT / "tests" / "support" / "scripts" / "stream_train.py"


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_batch_end(self, batch_idx, trainer, logs=None):
        if logs["ends_window"] and trainer.global_step == self.step:
            trainer.stop_training = True


def _step_run(callbacks=(), resume_from=None):
    model = make_model(dropout=0.2)
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=0.01), nn.CrossEntropyLoss(), seed=4,
                      callbacks=list(callbacks), stop_check_period=0, progress_bar=False)
    # 40 samples, 2 ranks, batch 4: 5 steps per epoch; 13 steps end inside the third epoch.
    trainer.fit(DataLoader(make_dataset(40), batch_size=4, shuffle=True), max_steps=13,
                val_loader=DataLoader(make_dataset(20, seed=1), batch_size=8), eval_every_n_steps=4,
                resume_from=resume_from)
    return trainer


def _steps_and_resume(rank, world_size, folder):
    full = _step_run()
    stopped = _step_run([StopAt(6)])  # between the evaluations at steps 4 and 8
    stopped.save_checkpoint(f"{folder}/mid.ckpt")
    resumed = _step_run(resume_from=f"{folder}/mid.ckpt")
    return {name: {"params": flat_params(t.module), "history": t.history, "step": t.global_step, "epoch": t.epoch}
            for name, t in (("full", full), ("stopped", stopped), ("resumed", resumed))}


def test_max_steps_with_evaluations_across_epochs_resumes_exactly_between_evaluations(tmp_path):
    for rank in run_spawn(_steps_and_resume, 2, str(tmp_path)):
        full, stopped, resumed = rank["full"], rank["stopped"], rank["resumed"]
        assert (full["step"], full["epoch"]) == (13, 3)  # the third epoch ended at max_steps
        assert full["history"]["eval_step"] == [4, 8, 12]  # across epoch boundaries (5 steps per epoch)
        assert len(full["history"]["val_loss"]) == 3 and len(full["history"]["train_loss"]) == 3
        assert stopped["step"] == 7 and stopped["history"]["eval_step"] == [4]
        assert torch.equal(resumed["params"], full["params"])
        assert resumed["history"] == full["history"]  # the next evaluation at step 8, as uninterrupted


def _torchrun_stream(tmp_path, name, *args):
    return torchrun(STREAM, *args, "--out", str(tmp_path / f"{name}.pt"), timeout=240, check=False,
                    env=child_env())


def test_streams_of_unequal_length_end_together_and_a_stateful_loader_resumes_exactly(tmp_path):
    """Rank 1's stream is two batches longer: every epoch ends at the same step on both ranks. SIGUSR1
    to rank 1 mid-epoch: every rank saves and exits 75; the restart resumes the StatefulDataLoader
    where it was and ends bit-identical to the uninterrupted run."""
    pytest.importorskip("torchdata", reason="torchdata (the 'stream' extra) provides StatefulDataLoader")
    reference = _torchrun_stream(tmp_path, "reference", "--loader", "stateful")
    assert reference.returncode == 0, reference.stderr
    ckpt = tmp_path / "ckpt"
    first = _torchrun_stream(tmp_path, "first", "--loader", "stateful", "--signal-step", "3", "--checkpoint-dir", str(ckpt))
    assert re.findall(r"exitcode\s+: (-?\d+)", first.stderr) == ["75", "75"], first.stderr  # every rank
    assert "SIGUSR1 received: every rank stopped after optimizer step 4" in first.stderr
    second = _torchrun_stream(tmp_path, "second", "--loader", "stateful", "--checkpoint-dir", str(ckpt))
    assert second.returncode == 0, second.stderr
    expected, resumed = torch.load(tmp_path / "reference.pt"), torch.load(tmp_path / "second.pt")
    assert expected["steps"] == resumed["steps"] == [10, 10]  # 5 windows of K=2 per epoch, 2 epochs
    assert torch.equal(expected["params"], resumed["params"])
    assert expected["history"] == resumed["history"]


def test_a_plain_iterable_preempted_mid_epoch_repeats_the_epoch_and_says_so(tmp_path):
    ckpt = tmp_path / "ckpt"
    first = _torchrun_stream(tmp_path, "first", "--loader", "plain", "--signal-step", "3", "--checkpoint-dir", str(ckpt))
    assert re.findall(r"exitcode\s+: (-?\d+)", first.stderr) == ["75", "75"], first.stderr
    second = _torchrun_stream(tmp_path, "second", "--loader", "plain", "--checkpoint-dir", str(ckpt))
    assert second.returncode == 0, second.stderr
    assert "cannot start an epoch part-way, so epoch 0 is repeated from its start: 8 micro-batch(es)" in second.stderr
    assert torch.load(tmp_path / "second.pt")["steps"] == [14, 14]  # 4 before the stop, then 2 whole epochs


def test_loaders_that_cannot_be_read_again_are_errors_not_nan():
    model = make_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), progress_bar=False)
    batches = [(x.unsqueeze(0), y.unsqueeze(0)) for x, y in make_dataset(8)]
    with pytest.raises(ValueError, match="train_loader is a one-shot iterator \\(generator\\).*num_epochs=2"):
        trainer.fit((b for b in batches), num_epochs=2)
    with pytest.raises(ValueError, match="the train loader yielded no batches in epoch 0 on any rank"):
        trainer.fit([], num_epochs=1)
    # max_steps over a one-shot generator that holds enough batches is fine; one that runs dry is an error
    trainer.fit((b for b in batches), max_steps=5)
    assert trainer.global_step == 5
    with pytest.raises(ValueError, match="yielded no batches in epoch 2 .*one-shot iterator"):
        trainer.fit((b for b in batches), max_steps=20)
    with pytest.raises(ValueError, match="fit\\(\\) needs num_epochs=... or max_steps="):
        trainer.fit(batches)
    with pytest.raises(ValueError, match="eval_every_n_steps=5 needs a val_loader"):
        trainer.fit(batches, max_steps=3, eval_every_n_steps=5)
