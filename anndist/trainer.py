"""The Trainer: any model, optimizer and loss, from one process to many nodes.

Read ``fit`` top to bottom: per epoch, per micro-batch: forward and backward (inside DDP's
``no_sync`` except on the last micro-batch of an accumulation window), then one optimizer step per
window (``train_step.py``). Where the run is lives in ``self.state`` (``train_state.py``); what a
checkpoint holds is ``self.run_state``, a set of objects with ``state_dict()`` that the checkpoint
code saves and restores without knowing the Trainer. Everything else (logging, checkpoints,
profiling, preemption) lives in callbacks.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from . import checkpoint, collectives, log, process_group
from .accumulation import with_last
from .agreement import StopAgreement
from .callbacks.base import Callback, CallbackList
from .callbacks.checkpoint import ModelCheckpoint
from .callbacks.preemption import PreemptionCallback
from .callbacks.progress import ProgressBarCallback, progress_bar_wanted
from .checkpoint.folder import resolve as resolve_checkpoint
from .config import TrainerConfig
from .env import DistEnv, detect_env
from .batch import split_batch
from .evaluation import Evaluator
from .loss import call_on_inputs, model_loss
from .optimization import OptimizerStep
from .precision import make_precision
from .prediction import predict
from .loaders import RankLoaders
from .sampler import start_epoch
from .seed import RNGState, rank_seed, seed_everything
from .train_state import EpochSums, TrainState
from .train_step import TrainStep

logger = logging.getLogger(__name__)
HISTORY_KEYS = ("train_loss", "val_loss", "val_accuracy")


class Trainer:
    """Trains ``model`` with ``optimizer``: on ``criterion(outputs, targets)``, on the loss the model
    computes itself (no criterion), or on ``compute_loss``; see ``TrainerConfig`` for options."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: Callable | None = None,
                 callbacks: Sequence[Callback] | None = None, **options: Any) -> None:
        self.config = cfg = TrainerConfig.from_options(model, optimizer, criterion, options)
        self.env: DistEnv = detect_env(os.environ)
        self.device = cfg.device or _default_device(self.env)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.created_process_group = process_group.init_process_group(
            self.env, cfg.backend or process_group.default_backend(self.device), cfg.dist_timeout)
        self.rank, self.world_size = collectives.rank(), collectives.world_size()
        log.configure(self.rank)  # the one rank-zero decision for every log line
        self.local_rank = self.env.local_rank if self.env.is_distributed else 0
        self.is_main_process = self.rank == 0

        self.module = model.to(self.device)
        self.model: nn.Module = self.module
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.module, device_ids=device_ids, **cfg.ddp_kwargs)  # syncs rank 0's weights
        process_group.register_releaser(self)
        if cfg.seed is not None:
            seed_everything(rank_seed(cfg.seed, self.rank))

        self.optimizer, self.criterion, self.scheduler = optimizer, criterion, cfg.scheduler
        self.precision = make_precision(cfg.amp_dtype, self.device)
        self.callbacks = _with_defaults(CallbackList(callbacks, rank=self.rank), cfg)
        self._optimizer_step = OptimizerStep(
            optimizer, self.precision, cfg.scheduler, cfg.scheduler is not None and cfg.scheduler_interval == "step",
            cfg.max_grad_norm, cfg.on_nonfinite)
        loss_step = self._loss_step()
        self._step = TrainStep(self.model, self.module, criterion, loss_step, self.precision, self._optimizer_step,
                               cfg.gradient_accumulation_steps, cfg.sum_reduction, self.device, self.world_size)
        self.metrics = {name: _to(metric, self.device) for name, metric in cfg.metrics.items()}
        self._evaluator = Evaluator(criterion, loss_step, self.metrics, cfg.metric_inputs, self.device, self.precision)
        self._history_keys = HISTORY_KEYS + tuple(f"val_{name}" for name in self.metrics)
        self._agreement = StopAgreement(self.device, cfg.stop_check_period)
        self.state = TrainState(self.world_size, cfg.seed)
        self.epoch_sums = EpochSums(self.rank, self.world_size, self.device)
        self.run_state = self._make_run_state()
        self._loaders = RankLoaders(self.world_size, self.rank, cfg.seed or 0,
                                    cfg.rebuild_train_loader, cfg.rebuild_eval_loader)
        self.pending_auto_resume = cfg.auto_resume  # the first fit() looks for a checkpoint
        self.stop_training = False

    # ------------------------------------------------------------------ progress (in self.state)
    epoch = property(lambda self: self.state.epoch, doc="The epoch being trained, or the next one to train.")
    global_step = property(lambda self: self.state.global_step, doc="Optimizer steps taken.")
    batch_in_epoch = property(lambda self: self.state.batch_in_epoch,
                              doc="Micro-batches of ``epoch`` this rank has trained (after a step).")
    history = property(lambda self: self.state.history, doc="Per-epoch lists: train_loss, val_loss, ...")

    # ------------------------------------------------------------------ training
    def fit(self, train_loader: Iterable, num_epochs: int, val_loader: Iterable | None = None,
            resume_from: str | os.PathLike | None = None) -> dict[str, list[float]]:
        """Train until ``num_epochs`` epochs are done (counting resumed ones) or a callback stops the run.

        ``resume_from``: a checkpoint file, a folder (its latest checkpoint) or ``"latest"`` (of
        ``checkpoint_dir``) to continue a run exactly where it was saved; see docs/checkpoints.md.
        """
        _check_epochs(num_epochs)
        self._resume(resume_from)
        loader = self._loaders.train(train_loader)
        self.stop_training = False
        try:
            self.callbacks.call("on_train_begin", trainer=self, logs={"num_epochs": num_epochs, "start_epoch": self.epoch})
            while self.epoch < num_epochs and not self.stop_training:
                logs = self._train_epoch(loader, val_loader)
                if logs is None:  # stopped mid-epoch: the position stays for a checkpoint
                    break
                self.state.epoch_done = True
                self.callbacks.call("on_epoch_end", self.epoch, trainer=self, logs=logs)
                self.state.finish_epoch()
                self.stop_training = self._agreement.decide(self.stop_training)
            self.callbacks.call("on_train_end", trainer=self, logs={"history": self.history})
        except BaseException as exc:
            self.callbacks.call_on_exception(exc, trainer=self)
            self._abort()
            raise
        return self.history

    def _train_epoch(self, loader: Iterable, val_loader: Iterable | None) -> dict[str, float] | None:
        """Train one epoch and evaluate; None when a stop cut the epoch short (no ``on_epoch_end``)."""
        epoch, started, skip = self.epoch, time.perf_counter(), self.batch_in_epoch
        if isinstance(loader, DataLoader):
            start_epoch(loader, epoch, self.config.seed or 0, self.rank, skip * (loader.batch_size or 0))
        elif skip:
            raise RuntimeError("cannot resume mid-epoch with a train loader that is not a DataLoader")
        self.callbacks.call("on_epoch_begin", epoch, trainer=self, logs=_position(loader, skip))
        self.model.train()
        if not skip:  # a resumed epoch continues the partial sums its checkpoint carried
            self.epoch_sums.reset()
        if not self._run_batches(loader, skip):
            return None
        logs = self._epoch_train_metrics()
        if val_loader is not None:
            logs.update(self.evaluate(val_loader))
        self._step_epoch_scheduler(logs)
        logs["epoch_time"] = time.perf_counter() - started
        self.state.record(logs, self._history_keys)
        return logs

    def _run_batches(self, loader: Iterable, first_idx: int) -> bool:
        """Train the epoch's micro-batches; return False if a stop cut the epoch short."""
        cbs, state, sums, k = self.callbacks, self.state, self.epoch_sums, self.config.gradient_accumulation_steps
        self._step.begin_epoch(getattr(loader, "batch_size", None))
        for batch_idx, (batch, is_last) in enumerate(with_last(loader), start=first_idx):
            cbs.call("on_batch_begin", batch_idx, trainer=self, logs={"epoch": state.epoch})
            ends_window = is_last or (batch_idx + 1) % k == 0
            loss, n, items = self._step.micro_batch(batch, sync=ends_window)
            sums.add(loss, items)
            cbs.call("on_backward_end", batch_idx, trainer=self, logs={"loss": loss, "ends_window": ends_window})
            stepped = False
            if ends_window:
                stepped = self._step.finish_window(self._where(batch_idx))
                state.global_step += stepped
                state.batch_in_epoch = batch_idx + 1
            cbs.call("on_batch_end", batch_idx, trainer=self,
                     logs={"loss": loss, "batch_size": n, "num_items": items, "ends_window": ends_window,
                           "stepped": stepped})
            if ends_window and self._agreement.propose(self.stop_training):
                self.stop_training = True
                self._agreement.settle()
                return False
        return True

    def _epoch_train_metrics(self) -> dict[str, float]:
        sums = self.epoch_sums
        totals = torch.stack([sums.loss_sum, torch.as_tensor(sums.items, dtype=torch.float64, device=self.device)])
        self._agreement.settle()
        collectives.all_reduce(totals)
        total_loss, total_samples = totals.tolist()
        return {"train_loss": total_loss / total_samples if total_samples else float("nan")}

    def _step_epoch_scheduler(self, logs: dict[str, float]) -> None:
        cfg = self.config
        if self.scheduler is None or cfg.scheduler_interval != "epoch":
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if cfg.scheduler_monitor not in logs:
                raise ValueError(
                    f"scheduler_monitor={cfg.scheduler_monitor!r} is not among this epoch's metrics "
                    f"{sorted(logs)}; pass a val_loader or monitor 'train_loss'")
            self.scheduler.step(logs[cfg.scheduler_monitor])
        else:
            self.scheduler.step()

    def _where(self, batch_idx: int) -> str:
        return f"optimizer step {self.global_step + 1} (epoch {self.epoch}, batch {batch_idx})"

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, loader: Iterable) -> dict[str, float]:
        """Loss, accuracy (classification with a criterion) and ``metrics`` over exactly the loader's
        samples, as ``val_*`` keys, identical on every rank."""
        self.callbacks.call("on_evaluate_begin", trainer=self, logs={})
        metrics = self._evaluator(self.module, self._loaders.eval(loader))
        self.callbacks.call("on_evaluate_end", trainer=self, logs=dict(metrics))
        return metrics

    def predict(self, loader: Iterable, main_process_only: bool = False) -> torch.Tensor | None:
        """The model's outputs (``logits`` of a ``ModelOutput``) for every sample once, in dataset order,
        on every rank (on rank 0 only with ``main_process_only``); see ``prediction.py`` for the memory."""
        return predict(self.module, self._loaders.eval(loader), self.criterion is not None and
                       self.config.compute_loss is None, self.device, self.precision, main_process_only)

    def compute_loss(self, model: nn.Module, batch: Any) -> Any:
        """One micro-batch's loss, the batch already on the device: override it in a subclass (or pass
        ``compute_loss=``) to return a scalar or ``(loss, num_items)``; see ``loss.py``."""
        if self.criterion is None:
            return model_loss(model, batch)
        inputs, targets = split_batch(batch)
        return self.criterion(call_on_inputs(model, inputs), targets)

    def _loss_step(self) -> Callable | None:
        """The loss function the step calls; None keeps the criterion's short path."""
        if self.config.compute_loss is not None:
            return self.config.compute_loss
        if type(self).compute_loss is not Trainer.compute_loss:
            return self.compute_loss
        return None if self.criterion is not None else model_loss

    # ------------------------------------------------------------------ checkpoints
    def _make_run_state(self) -> checkpoint.RunState:
        states = {"model": self.module, "optimizer": self.optimizer, "scaler": self.precision,
                  "train_state": self.state, "callbacks": self.callbacks}
        if self.scheduler is not None:
            states["scheduler"] = self.scheduler
        return checkpoint.RunState(states, {"rng": RNGState(self.rank), "epoch_sums": self.epoch_sums},
                                   ready_to_save=self._check_window_closed)

    def save_checkpoint(self, path: str | os.PathLike, **metadata: Any) -> Path:
        """Save everything needed to continue this run exactly to ``path``; call it on **every rank**.

        Rank 0 alone writes (atomically: a crash leaves the old file or the new one), after gathering
        every rank's RNG state; all ranks return once the file is complete. ``metadata`` (numbers,
        strings, tensors, lists, dicts) comes back from ``load_checkpoint``. See docs/checkpoints.md.
        """
        return checkpoint.save(path, self.run_state, metadata)

    def save_in_dir(self, dirpath: str | os.PathLike, name: str | None = None, **metadata: Any) -> Path:
        """Save to ``dirpath/name.ckpt`` (``step-<global step>.ckpt`` when name is None) and point ``latest`` at it."""
        name = name if name is not None else checkpoint.step_name(self.global_step)
        return checkpoint.CheckpointFolder(dirpath).save(self.run_state, name, metadata)

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore a checkpoint on **every rank** (each rank its own RNG streams); return its metadata."""
        metadata = checkpoint.load(path, self.run_state)
        logger.info("resumed from %s: epoch %d, optimizer step %d, %d batch(es) into the epoch",
                    path, self.epoch, self.global_step, self.batch_in_epoch)
        return metadata

    def state_dict(self) -> dict[str, Any]:
        """The state every rank shares (model, optimizer, scheduler, scaler, train_state, callbacks); no RNG."""
        return {name: obj.state_dict() for name, obj in self.run_state.states.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, obj in self.run_state.states.items():
            if name in state:
                obj.load_state_dict(state[name])

    def _resume(self, resume_from: str | os.PathLike | None) -> None:
        """fit()'s ``resume_from`` or ``auto_resume``: rank 0 picks the file, every rank loads that one."""
        if resume_from is None and not self.pending_auto_resume:
            return
        if resume_from is not None and not isinstance(resume_from, (str, os.PathLike)):
            raise TypeError(
                f"resume_from must be a path, 'latest' or None, got {type(resume_from).__name__} {resume_from!r}")
        self.pending_auto_resume = False
        found = collectives.run_collectively(lambda: self._locate(resume_from) if self.is_main_process else None)
        path = collectives.broadcast_object(found)
        if path is None:
            logger.info("auto_resume: no checkpoint in %s yet, starting from scratch", self.config.checkpoint_dir)
            return
        self.load_checkpoint(path)

    def _locate(self, resume_from: str | os.PathLike | None) -> str | None:
        if resume_from is None:  # auto_resume: a missing checkpoint means a first start
            found = checkpoint.latest_checkpoint(self.config.checkpoint_dir)
            return None if found is None else str(found)
        return str(resolve_checkpoint(resume_from, self._checkpoint_folder()))

    def _checkpoint_folder(self) -> Path | None:
        """``checkpoint_dir``, else the folder of the one ModelCheckpoint that names one."""
        if self.config.checkpoint_dir is not None:
            return Path(self.config.checkpoint_dir)
        folders = {Path(cb.dirpath) for cb in self.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath}
        return folders.pop() if len(folders) == 1 else None

    def _check_window_closed(self) -> None:
        # The optimizer zeroes gradients (to None) after each step, so gradients here mean a half-done
        # accumulation window, which a checkpoint cannot hold: resuming would silently drop it.
        if any(p.grad is not None for p in self.module.parameters()):
            raise RuntimeError(
                f"save_checkpoint() was called in the middle of an accumulation window (epoch {self.epoch}, "
                f"after optimizer step {self.global_step}): the gradients accumulated so far cannot be "
                "checkpointed; save from on_batch_end when logs['ends_window'] is true, at on_epoch_end, or after fit()")

    # ------------------------------------------------------------------ teardown
    def release_distributed(self) -> None:
        """Drop the DDP wrapper (before the process group goes); the bare module stays usable."""
        self.model = self.module

    def close(self) -> None:
        """Release DDP and destroy the process group if this Trainer created it. Also runs at exit."""
        self.release_distributed()
        if self.created_process_group:
            process_group.teardown()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _abort(self) -> None:
        # Closing our group makes peers blocked in a collective fail fast instead of waiting for the timeout.
        if self.created_process_group and self.world_size > 1:
            self.close()


def _with_defaults(callbacks: CallbackList, cfg: TrainerConfig) -> CallbackList:
    """Append the callbacks the options ask for: the progress bar, then preemption handling (last, so
    the other callbacks' ``on_train_end`` run before its exit)."""
    if progress_bar_wanted(cfg.progress_bar, os.environ, sys.stderr, callbacks):
        callbacks.append(ProgressBarCallback())
    if cfg.handle_signals and not any(isinstance(cb, PreemptionCallback) for cb in callbacks):
        callbacks.append(PreemptionCallback())
    return callbacks


def _position(loader: Iterable, skip: int) -> dict[str, int | None]:
    """Where an epoch starts: its first batch index and its batch count (None when unknown)."""
    try:
        remaining = len(loader)  # type: ignore[arg-type]
    except TypeError:
        remaining = None
    return {"first_batch": skip, "num_batches": None if remaining is None else skip + remaining}


def _to(metric: Any, device: torch.device) -> Any:
    """A metric that is a module (torchmetrics) keeps its states on the Trainer's device."""
    return metric.to(device) if isinstance(metric, nn.Module) else metric


def _default_device(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _check_epochs(num_epochs: Any) -> None:
    if isinstance(num_epochs, bool) or not isinstance(num_epochs, int):
        raise TypeError(f"num_epochs must be an int, got {type(num_epochs).__name__} {num_epochs!r}")
    if num_epochs < 0:
        raise ValueError(f"num_epochs={num_epochs} is negative; pass the number of epochs to train (>= 0)")


def save_in_dir(trainer: Trainer, dirpath: str | os.PathLike, name: str | None = None, **metadata: Any) -> Path:
    """``trainer.save_in_dir(...)``, as a function (call it on every rank)."""
    return trainer.save_in_dir(dirpath, name, **metadata)
