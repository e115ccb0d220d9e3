"""The Trainer: any model, optimizer and loss, from one process to many nodes.

Read ``fit`` top to bottom: per epoch, per micro-batch: forward and backward (inside DDP's
``no_sync`` except on the last micro-batch of an accumulation window), then one optimizer step per
window. Everything else (logging, checkpoints, profiling, preemption) lives in callbacks.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from . import checkpoint, process_group
from .accumulation import Window, with_last
from .batch import prepare_batch
from .callbacks.base import Callback, CallbackList
from .callbacks.preemption import PreemptionCallback
from .callbacks.progress import ProgressBarCallback, progress_bar_wanted
from .config import TrainerConfig
from .env import DistEnv, detect_env
from .evaluation import evaluate as evaluate_loader
from .optimization import OptimizerStep
from .precision import Precision
from .sampler import is_rebuildable, shard_eval_loader, shard_train_loader, start_epoch
from .seed import rank_seed, seed_everything


class Trainer:
    """Trains ``model`` with ``optimizer`` on ``criterion(outputs, targets)``; see ``TrainerConfig`` for options."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: Callable,
                 callbacks: Sequence[Callback] | None = None, **options: Any) -> None:
        self.config = TrainerConfig.from_options(model, optimizer, criterion, options)
        cfg = self.config
        self.env: DistEnv = detect_env(os.environ)
        self.device = cfg.device or _default_device(self.env)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.created_process_group = process_group.init_process_group(
            self.env, cfg.backend or process_group.default_backend(self.device), cfg.dist_timeout)
        self.rank, self.world_size = process_group.rank(), process_group.world_size()
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
        self.precision = Precision(cfg.amp_dtype, self.device)
        self.callbacks = _with_defaults(CallbackList(callbacks, rank=self.rank), cfg)
        self._optimizer_step = OptimizerStep(
            optimizer, self.precision, cfg.scheduler, cfg.scheduler is not None and cfg.scheduler_interval == "step",
            cfg.max_grad_norm, cfg.on_nonfinite)
        self._agreement = process_group.Agreement(self.device, cfg.stop_check_period)
        self._train_source: Iterable | None = None  # the user's loader behind self._train_loader
        self._train_loader: Iterable | None = None
        self._eval_loaders: "weakref.WeakKeyDictionary[Any, DataLoader]" = weakref.WeakKeyDictionary()
        self._non_blocking = self.device.type == "cuda"
        self.epoch = 0             # the epoch being trained, or the next one to train
        self.global_step = 0       # optimizer steps taken
        self.batch_in_epoch = 0    # micro-batches of ``epoch`` already trained (after a step)
        self.epoch_complete = False  # True inside on_epoch_end: a checkpoint then resumes at the next epoch
        self.epoch_loss_sum: torch.Tensor | float = 0.0  # this rank's sum of loss * samples in ``epoch`` so far
        self.epoch_samples = 0     # this rank's samples of ``epoch`` trained (after a step)
        self.pending_auto_resume = cfg.auto_resume  # the first fit() looks for a checkpoint
        self.stop_training = False
        self.history: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ training
    def fit(self, train_loader: Iterable, num_epochs: int, val_loader: Iterable | None = None,
            resume_from: str | os.PathLike | None = None) -> dict[str, list[float]]:
        """Train until ``num_epochs`` epochs are done (counting resumed ones) or a callback stops the run.

        ``resume_from``: a checkpoint file, a folder (its latest checkpoint) or ``"latest"`` (of
        ``checkpoint_dir``) to continue a run exactly where it was saved; see docs/checkpoints.md.
        """
        _check_epochs(num_epochs)
        checkpoint.resume(self, resume_from)
        loader = self._prepare_train_loader(train_loader)
        self.stop_training = False
        self.callbacks.call("on_train_begin", trainer=self, logs={"num_epochs": num_epochs, "start_epoch": self.epoch})
        try:
            while self.epoch < num_epochs and not self.stop_training:
                logs = self._train_epoch(loader, val_loader)
                if logs is None:  # stopped mid-epoch: the position stays for a checkpoint
                    break
                self.epoch_complete = True
                self.callbacks.call("on_epoch_end", self.epoch, trainer=self, logs=logs)
                self.epoch, self.batch_in_epoch, self.epoch_complete = self.epoch + 1, 0, False
                self.stop_training = self._agreement.decide(self.stop_training)
            self.callbacks.call("on_train_end", trainer=self, logs={"history": self.history})
        except BaseException:
            self._abort()
            raise
        return self.history

    def _train_epoch(self, loader: Iterable, val_loader: Iterable | None) -> dict[str, float] | None:
        """Train one epoch and evaluate; None when a stop cut the epoch short (no ``on_epoch_end``)."""
        epoch, started = self.epoch, time.perf_counter()
        seed = self.config.seed or 0
        skip = self.batch_in_epoch
        if isinstance(loader, DataLoader):
            start_epoch(loader, epoch, seed, self.rank, skip * (loader.batch_size or 0))
        elif skip:
            raise RuntimeError("cannot resume mid-epoch with a train loader that is not a DataLoader")
        self.callbacks.call("on_epoch_begin", epoch, trainer=self, logs=_position(loader, skip))
        self.model.train()
        if not skip:
            self.epoch_loss_sum, self.epoch_samples = 0.0, 0
        # A resumed epoch continues the partial sums its checkpoint carried, so train_loss is exact.
        loss_sum = self.epoch_loss_sum = torch.as_tensor(self.epoch_loss_sum, dtype=torch.float64, device=self.device)
        samples = self._run_batches(loader, skip, loss_sum)
        if samples is None:
            return None
        logs = self._epoch_train_metrics(loss_sum, samples)
        if val_loader is not None:
            logs.update(self.evaluate(val_loader))
        self._step_epoch_scheduler(logs)
        logs["epoch_time"] = time.perf_counter() - started
        for key in ("train_loss", "val_loss", "val_accuracy"):
            if key in logs:
                self.history.setdefault(key, []).append(logs[key])
        return logs

    def _run_batches(self, loader: Iterable, first_idx: int, loss_sum: torch.Tensor) -> int | None:
        """Train the epoch's micro-batches; return this rank's sample count, or None if stopped early."""
        cfg, cbs = self.config, self.callbacks
        k = cfg.gradient_accumulation_steps
        window = Window(k, cfg.sum_reduction, getattr(loader, "batch_size", None))
        samples = self.epoch_samples
        for batch_idx, (batch, is_last) in enumerate(with_last(loader), start=first_idx):
            cbs.call("on_batch_begin", batch_idx, trainer=self, logs={"epoch": self.epoch})
            ends_window = is_last or (batch_idx + 1) % k == 0
            loss, n = self._forward_backward(batch, window, sync=ends_window)
            loss_sum.add_(loss, alpha=n)
            samples += n
            cbs.call("on_backward_end", batch_idx, trainer=self, logs={"loss": loss, "ends_window": ends_window})
            stepped = False
            if ends_window:
                stepped = self._optimizer_step(window.correction(), window.losses, self._where(batch_idx))
                self.global_step += stepped
                self.batch_in_epoch, self.epoch_samples = batch_idx + 1, samples
                window.reset()
            cbs.call("on_batch_end", batch_idx, trainer=self,
                     logs={"loss": loss, "batch_size": n, "ends_window": ends_window, "stepped": stepped})
            if ends_window and self._agreement.propose(self.stop_training):
                self.stop_training = True
                self._agreement.settle()
                return None
        return samples

    def _forward_backward(self, batch: Any, window: Window, sync: bool) -> tuple[torch.Tensor, int]:
        inputs, targets, n = prepare_batch(batch, self.device, self._non_blocking)
        no_sync = self.model.no_sync() if not sync and self.model is not self.module else contextlib.nullcontext()
        with no_sync:
            with self.precision.autocast():
                loss = self.criterion(self.model(inputs), targets)
            weight = window.weight(n)
            self.precision.backward(loss * weight if weight != 1.0 else loss)
        loss = loss.detach()
        window.add(loss, n)
        return loss, n

    def _epoch_train_metrics(self, loss_sum: torch.Tensor, samples: int) -> dict[str, float]:
        totals = torch.stack([loss_sum, torch.tensor(float(samples), dtype=torch.float64, device=self.device)])
        self._agreement.settle()
        process_group.all_reduce(totals)
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
        """Loss (and accuracy for classification) over exactly the loader's samples, identical on every rank."""
        self.callbacks.call("on_evaluate_begin", trainer=self, logs={})
        metrics = evaluate_loader(self.module, self._prepare_eval_loader(loader), self.criterion,
                                  self.device, self.precision, self._non_blocking)
        self.callbacks.call("on_evaluate_end", trainer=self, logs=dict(metrics))
        return metrics

    # ------------------------------------------------------------------ loaders
    def _prepare_train_loader(self, loader: Iterable) -> Iterable:
        if isinstance(loader, DataLoader) and self.config.rebuild_train_loader and is_rebuildable(loader):
            if self._train_source is not loader:
                self._train_source = loader
                self._train_loader = shard_train_loader(loader, self.world_size, self.rank, self.config.seed or 0)
            return self._train_loader
        return loader

    def _prepare_eval_loader(self, loader: Iterable) -> Iterable:
        if not (isinstance(loader, DataLoader) and self.config.rebuild_eval_loader and is_rebuildable(loader)):
            return loader
        if loader not in self._eval_loaders:
            self._eval_loaders[loader] = shard_eval_loader(loader, self.world_size, self.rank)
        return self._eval_loaders[loader]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The run's state except RNG: model, optimizer, scheduler, scaler, progress, history, callbacks."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.precision.state_dict(),
            "progress": {"epoch": self.epoch + self.epoch_complete, "global_step": self.global_step,
                         "batch_in_epoch": 0 if self.epoch_complete else self.batch_in_epoch,
                         "world_size": self.world_size,
                         "seed": self.config.seed},
            "history": {key: list(values) for key, values in self.history.items()},
            "callbacks": self.callbacks.state_dict(),
        }

    def save_checkpoint(self, path: str | os.PathLike, **metadata: Any) -> Path:
        """Save everything needed to continue this run exactly to ``path``; call it on **every rank**.

        Rank 0 alone writes (atomically: a crash leaves the old file or the new one), after gathering
        every rank's RNG state; all ranks return once the file is complete. ``metadata`` (numbers,
        strings, tensors, lists, dicts) comes back from ``load_checkpoint``. See docs/checkpoints.md.
        """
        return checkpoint.save_checkpoint(self, path, metadata)

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore a checkpoint on **every rank** (each rank its own RNG streams); return its metadata."""
        return checkpoint.load_checkpoint(self, path)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state.get("scaler") or {})
        progress = state["progress"]
        self.epoch, self.global_step = progress["epoch"], progress["global_step"]
        self.batch_in_epoch = progress["batch_in_epoch"]
        self.history = {key: list(values) for key, values in state.get("history", {}).items()}
        self.callbacks.load_state_dict(state.get("callbacks", {}))

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


def _default_device(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _check_epochs(num_epochs: Any) -> None:
    if isinstance(num_epochs, bool) or not isinstance(num_epochs, int):
        raise TypeError(f"num_epochs must be an int, got {type(num_epochs).__name__} {num_epochs!r}")
    if num_epochs < 0:
        raise ValueError(f"num_epochs={num_epochs} is negative; pass the number of epochs to train (>= 0)")
