"""Entry point of the checkpoint tests: one fixed small run (shuffling, dropout, accumulation K=2,
AdamW with a per-step LR schedule, validation), started under ``python`` or ``torchrun``.

``--runs`` is a JSON list of runs done one after the other in this process, each with a fresh model
and Trainer, so one process start serves several runs. Keys of a run (all optional but ``name``):

    ckpt_dir, every_n_steps, keep_last   Trainer(checkpoint_dir=...) and ModelCheckpoint(monitor="val_loss")
    auto_resume, resume_from             Trainer(auto_resume=...), fit(resume_from=...)
    stop_at_step, stop_path              ask the run to stop at that step, then save_checkpoint(stop_path)
    sigkill_rank, sigkill_step           SIGKILL that rank at that step, on torchrun's first attempt only
    sigkill_save: [n, "write"|"commit"]  SIGKILL halfway through writing the n-th checkpoint, or just
                                         before the n-th update of the ``latest`` pointer

Rank 0 writes ``{name: result}`` to ``--out`` (final weights, the state seen at on_train_begin, the
history, and the dataset indices each rank read in each epoch).
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for support
from support import flat_params, make_dataset, make_model  # noqa: E402

from anndist import Callback, ModelCheckpoint, Trainer  # noqa: E402
from anndist.dist import collectives  # noqa: E402

SEED, BATCH, ACCUMULATION, EPOCHS = 7, 4, 2, 3


class RecordingDataset(Dataset):
    """The train set, noting which indices are read in which epoch (main process, num_workers=0)."""

    def __init__(self) -> None:
        self.data = make_dataset(100, seed=0)
        self.epoch, self.reads = 0, {}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        self.reads.setdefault(self.epoch, []).append(int(index))
        return self.data[index]


class Probe(Callback):
    """Records the state at on_train_begin (after any resume), stops or kills the run on request."""

    def __init__(self, spec: dict, dataset: RecordingDataset) -> None:
        self.spec, self.dataset, self.begin = spec, dataset, None

    def on_train_begin(self, trainer, logs=None):
        self.begin = {"params": flat_params(trainer.module), "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
                      "epoch": trainer.epoch, "global_step": trainer.global_step,
                      "batch_in_epoch": trainer.batch_in_epoch}

    def on_epoch_begin(self, epoch, trainer, logs=None):
        self.dataset.epoch = epoch

    def on_batch_end(self, batch_idx, trainer, logs=None):
        if not logs["ends_window"]:
            return
        if trainer.global_step == self.spec.get("stop_at_step"):
            trainer.stop_training = True
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if (first_attempt and trainer.rank == self.spec.get("sigkill_rank")
                and trainer.global_step == self.spec.get("sigkill_step")):
            os.kill(os.getpid(), signal.SIGKILL)


def kill_during_save(nth: int, where: str) -> None:
    """SIGKILL this process in the middle of the n-th checkpoint write, or before its pointer update."""
    calls = {"n": 0}
    if where == "write":
        real_save = torch.save

        def torn_save(obj, f, *args, **kwargs):
            if str(getattr(f, "name", "")).endswith(".tmp"):
                calls["n"] += 1
                if calls["n"] == nth:
                    buffer = io.BytesIO()
                    real_save(obj, buffer, *args, **kwargs)
                    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)

        torch.save = torn_save
    else:
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(dst).name == "latest":
                calls["n"] += 1
                if calls["n"] == nth:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace


def make_run(callbacks: list, dataset: Dataset | None = None, seed: int = SEED,
             **options) -> tuple[Trainer, DataLoader, DataLoader]:
    """The fixed run: a fresh model, optimizer, schedule and Trainer, and its train and val loaders."""
    model = make_model(dropout=0.3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.9)
    # stop_check_period=0: the ranks agree on a stop after every step, so the tests know where it lands.
    trainer = Trainer(model, optimizer, torch.nn.CrossEntropyLoss(), callbacks=callbacks, seed=seed,
                      gradient_accumulation_steps=ACCUMULATION, scheduler=scheduler,
                      **{"stop_check_period": 0, **options})
    dataset = dataset if dataset is not None else make_dataset(100, seed=0)
    train_loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
    return trainer, train_loader, DataLoader(make_dataset(40, seed=1), batch_size=8)


def train(spec: dict) -> tuple[Trainer, dict]:
    dataset = RecordingDataset()
    probe = Probe(spec, dataset)
    callbacks = [probe]
    if spec.get("every_n_steps"):
        callbacks.insert(0, ModelCheckpoint(spec["ckpt_dir"], every_n_steps=spec["every_n_steps"],
                                            keep_last=spec.get("keep_last", 3), monitor="val_loss"))
    trainer, train_loader, val_loader = make_run(callbacks, dataset, checkpoint_dir=spec.get("ckpt_dir"),
                                                 auto_resume=spec.get("auto_resume", False))
    history = trainer.fit(train_loader, EPOCHS, val_loader=val_loader, resume_from=spec.get("resume_from"))
    if spec.get("stop_path"):
        trainer.save_checkpoint(spec["stop_path"], reason="stop", step=trainer.global_step)
    result = {
        "params": flat_params(trainer.module), "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        "begin": probe.begin, "history": history, "world_size": trainer.world_size,
        "end": {"epoch": trainer.epoch, "global_step": trainer.global_step, "batch_in_epoch": trainer.batch_in_epoch},
        "reads": collectives.all_gather_object(dataset.reads),
        "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
    }
    return trainer, result


@record
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", required=True, help="JSON list of runs (see the module docstring)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results, trainers = {}, []
    for spec in json.loads(args.runs):
        if spec.get("sigkill_save"):
            kill_during_save(*spec["sigkill_save"])
        trainer, results[spec["name"]] = train(spec)
        trainers.append(trainer)
    if trainers and trainers[0].is_main_process:
        torch.save(results, args.out)
    for trainer in reversed(trainers):  # the first one created the process group: it goes last
        trainer.close()


if __name__ == "__main__":
    main()
