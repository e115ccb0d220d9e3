"""Long runs on 2 ranks: steps across epochs with evaluations every N steps, resumed between evaluations.
Streams under torchrun: tests/e2e/test_long_runs.py; loaders that cannot be read twice: tests/unit."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Callback, Trainer
from support import flat_params, make_dataset, make_model, run_spawn


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
