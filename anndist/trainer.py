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
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from . import checkpoint, log
from .dist import collectives, process_group, timeouts
from .strategies import fsdp
from .dist.agreement import StopAgreement
from .callbacks.base import Callback
from .callbacks.model_checkpoint import checkpoint_folder
from .callbacks.defaults import build_callbacks
from .dist.flight_recorder import enable_flight_recorder
from .checkpoint.manager import CheckpointManager, check_window_closed
from .strategies.compile import ModelState, compile_module, split_compiled
from .config import DDP_DEFAULTS, TrainerConfig
from .dist.device import default_device
from .dist.env import DistEnv, detect_env
from .data.batch import split_batch
from .evaluation.evaluator import Evaluator
from .step.loss import call_on_inputs, model_loss
from .step.optimization import OptimizerStep, step_epoch_scheduler, step_plateau
from .step.precision import make_precision
from .evaluation.prediction import predict
from .data.epoch_reader import epoch_position, micro_batches
from .data.loaders import LoaderState, RankLoaders, resumes_by_index, start_position
from .step.plan import RunPlan
from .data.sampler import start_epoch
from .seed import RNGState, rank_seed, seed_everything
from .step.train_state import EpochSums, TrainState
from .step.train_step import TrainStep

logger = logging.getLogger(__name__)
HISTORY_KEYS = ("train_loss", "val_loss", "val_accuracy")


class Trainer:
    """Trains ``model`` with ``optimizer``: on ``criterion(outputs, targets)``, on the loss the model
    computes itself (no criterion), or on ``compute_loss``; see ``TrainerConfig`` for options."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: Callable | None = None,
                 callbacks: Sequence[Callback] | None = None, **options: Any) -> None:
        self.config = cfg = TrainerConfig.from_options(model, optimizer, criterion, options)
        self._init_distributed(model, cfg)
        self.optimizer, self.criterion, self.scheduler = optimizer, criterion, cfg.scheduler
        if cfg.strategy == "fsdp":  # in place: self.model is self.module, now with DTensor parameters
            fsdp.shard(self.module, optimizer, cfg.fsdp_kwargs, cfg.shard_modules, cfg.amp_dtype, self.world_size)
        self.precision = make_precision(cfg.amp_dtype, self.device)
        self.callbacks = build_callbacks(callbacks, cfg, self.rank)
        self.state = TrainState(self.world_size, cfg.seed, cfg.gradient_accumulation_steps)
        self.epoch_sums = EpochSums(self.rank, self.world_size, self.device)
        self._init_steps(cfg)
        self.run_state = self._make_run_state()
        self.checkpoints = CheckpointManager(self.run_state, self.state, self._rng_state, cfg.checkpoint_dir,
                                             lambda: checkpoint_folder(cfg.checkpoint_dir, self.callbacks),
                                             cfg.auto_resume)
        self._loaders = RankLoaders(self.world_size, self.rank, cfg.seed or 0,
                                    cfg.rebuild_train_loader, cfg.rebuild_eval_loader)
        self.stop_training = False
        self._plan: RunPlan | None = None
        self._val_loader: Iterable | None = None

    def _init_distributed(self, model: nn.Module, cfg: TrainerConfig) -> None:
        """Device, process group, rank, the DDP wrapper, and the per-rank seed."""
        self.env: DistEnv = detect_env(os.environ)
        self.device = cfg.device or default_device(self.env)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = cfg.backend or process_group.default_backend(self.device)
        if cfg.watchdog_timeout is not None:
            enable_flight_recorder(backend, cfg.checkpoint_dir)
        self.created_process_group = process_group.init_process_group(self.env, backend, cfg.dist_timeout)
        self.rank, self.world_size = collectives.rank(), collectives.world_size()
        log.configure(self.rank)  # the one rank-zero decision for every log line
        self.local_rank = self.env.local_rank if self.env.is_distributed else 0
        self.is_main_process = self.rank == 0

        model, compiled = split_compiled(model)  # compiling.py: module, the compiled module, model
        self.module = model.to(self.device)
        self._compiled = compile_module(self.module, cfg.compile, compiled)
        self.model: nn.Module = self._compiled
        if self.world_size > 1 and cfg.strategy == "ddp":
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self._compiled, device_ids=device_ids, **{**DDP_DEFAULTS, **cfg.ddp_kwargs})  # syncs weights
        process_group.register_releaser(self)
        if cfg.seed is not None:
            seed_everything(rank_seed(cfg.seed, self.rank))

    def _init_steps(self, cfg: TrainerConfig) -> None:
        """The training step, the evaluation and the stop agreement."""
        optimizer, criterion = self.optimizer, self.criterion
        self._optimizer_step = OptimizerStep(
            optimizer, self.precision, cfg.scheduler, cfg.scheduler is not None and cfg.scheduler_interval == "step",
            cfg.max_grad_norm, cfg.on_nonfinite)
        loss_step = self._loss_step()
        self._step = TrainStep(self.model, self._compiled, criterion, loss_step, self.precision, self._optimizer_step,
                               cfg.gradient_accumulation_steps, cfg.sum_reduction, self.device, self.world_size,
                               self.epoch_sums)
        self._evaluator = Evaluator(criterion, loss_step, cfg.metrics, cfg.metric_inputs, self.device, self.precision)
        self.metrics = self._evaluator.metrics
        self._history_keys = HISTORY_KEYS + tuple(f"val_{name}" for name in self.metrics)
        self._agreement = StopAgreement(self.device, cfg.stop_check_period)

    # ------------------------------------------------------------------ progress (in self.state)
    epoch = property(lambda self: self.state.epoch, doc="The epoch being trained, or the next one to train.")
    global_step = property(lambda self: self.state.global_step, doc="Optimizer steps taken.")
    batch_in_epoch = property(lambda self: self.state.batch_in_epoch,
                              doc="Micro-batches of ``epoch`` this rank has trained (after a step).")
    history = property(lambda self: self.state.history, doc="Per-epoch lists: train_loss, val_loss, ...")

    @property
    def last_grad_norm(self) -> float:
        """The gradient norm before clipping at the last optimizer step (NaN unless ``max_grad_norm`` is set)."""
        return self._optimizer_step.last_grad_norm

    @property
    def eval_every_n_steps(self) -> int | None:
        """Validation every N optimizer steps in the current ``fit`` (None: at each epoch's end)."""
        return self._plan.eval_every_n_steps if self._plan is not None else None

    # ------------------------------------------------------------------ training
    def fit(self, train_loader: Iterable, num_epochs: int | None = None, val_loader: Iterable | None = None,
            resume_from: str | os.PathLike | None = None, *, max_steps: int | None = None,
            eval_every_n_steps: int | None = None) -> dict[str, list[float]]:
        """Train for ``num_epochs`` epochs or ``max_steps`` optimizer steps, whichever comes first
        (counting resumed ones), or until a callback stops the run. The loader is read epoch after epoch.

        ``val_loader`` is evaluated at each epoch's end, or after every ``eval_every_n_steps`` optimizer
        steps across epoch boundaries. ``resume_from``: a checkpoint file, a folder (its latest) or
        ``"latest"`` (of ``checkpoint_dir``) continues a run exactly where it was saved (docs/checkpoints.md).
        """
        plan = RunPlan.check(num_epochs, max_steps, eval_every_n_steps, train_loader, val_loader)
        self.checkpoints.check_folder()
        self._loader_state.attach(train_loader)  # before the resume, which may restore its position
        self.checkpoints.resume(resume_from)
        loader = self._loaders.train(train_loader)
        plan.warn_if_never_evaluating(loader, self.config.gradient_accumulation_steps)
        self._plan, self._val_loader, self.stop_training = plan, val_loader, False
        try:
            self.callbacks.call("on_train_begin", trainer=self, logs={
                "num_epochs": num_epochs, "max_steps": max_steps, "start_epoch": self.epoch,
                "validates": val_loader is not None})
            while not plan.done(self.state) and not self.stop_training:
                logs = self._train_epoch(loader)
                if logs is None:  # stopped mid-epoch: the position stays for a checkpoint
                    break
                self.state.epoch_done = True
                self.callbacks.call("on_epoch_end", self.epoch, trainer=self, logs=logs)
                self.state.finish_epoch()
                self.stop_training = self._agreement.decide(self.stop_training)
            self.callbacks.call("on_train_end", trainer=self,
                                logs={"history": self.history, "completed": plan.done(self.state)})
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            self._plan = self._val_loader = None
        return self.history

    def _train_epoch(self, loader: Iterable) -> dict[str, float] | None:
        """Train one epoch and evaluate; None when a stop cut the epoch short (no ``on_epoch_end``)."""
        epoch, started, skip = self.epoch, time.perf_counter(), start_position(loader, self.state, self._loader_state)
        if isinstance(loader, DataLoader):  # set_epoch, and the resume offset of a loader anndist rebuilt
            offset = skip * (loader.batch_size or 0) if resumes_by_index(loader) else 0
            start_epoch(loader, epoch, self.config.seed or 0, self.rank, offset)
        self.callbacks.call("on_epoch_begin", epoch, trainer=self, logs=epoch_position(loader, skip))
        self.model.train()
        if not skip:  # a resumed epoch continues the partial sums its checkpoint carried
            self.epoch_sums.reset()
        if not self._run_batches(loader, skip):
            return None
        self._agreement.settle()  # no stop proposal in flight across the reduction
        logs = {"train_loss": self.epoch_sums.train_loss(self.epoch)}
        if self._val_loader is not None and self.eval_every_n_steps is None:
            logs.update(self._validate(self._val_loader, "epoch"))
        self._step_epoch_scheduler(logs)
        logs["epoch_time"] = time.perf_counter() - started
        self.state.record(logs, ("train_loss",) if self.eval_every_n_steps else self._history_keys)
        return logs

    def _run_batches(self, loader: Iterable, first_idx: int) -> bool:
        """Train the epoch's micro-batches; return False if a stop cut the epoch short."""
        cbs, state, k = self.callbacks, self.state, self.config.gradient_accumulation_steps
        self._step.begin_epoch(getattr(loader, "batch_size", None))
        equal = resumes_by_index(loader) or (self.world_size == 1 and self._loader_state.loader is None)
        batches = iter(loader)
        self._rng_state.apply()  # after iter(): see RNGState
        begin, backward_end, end = (cbs.has(hook) for hook in ("on_batch_begin", "on_backward_end", "on_batch_end"))
        micro_batch = self._step.micro_batch
        for batch_idx, (batch, ends) in enumerate(micro_batches(batches, k, first_idx, equal, self.device), first_idx):
            ends_window = ends or (batch_idx + 1) % k == 0
            if begin:
                cbs.call("on_batch_begin", batch_idx, trainer=self, logs={"epoch": state.epoch})
            loss, n, items = micro_batch(batch, ends_window)
            if backward_end:
                cbs.call("on_backward_end", batch_idx, trainer=self, logs={"loss": loss, "ends_window": ends_window})
            stepped = False
            if ends_window:
                stepped = self._step.finish_window(partial(self._where, batch_idx))  # formatted on error only
                state.global_step += stepped
                state.batch_in_epoch = batch_idx + 1
            if end:  # no logs dict for no one
                cbs.call("on_batch_end", batch_idx, trainer=self, logs={
                    "loss": loss, "batch_size": n, "num_items": items, "ends_window": ends_window, "stepped": stepped})
            if not ends_window:
                continue
            if stepped and self._plan.evaluates_after(state.global_step):
                self._validate(self._val_loader, "step")
            if self._plan.steps_done(state):  # max_steps: the epoch ends here
                return True
            if self._agreement.propose(self.stop_training):
                self.stop_training = True
                self._agreement.settle()
                return False
        return True

    def _validate(self, loader: Iterable, when: str) -> dict[str, float]:
        """Evaluate inside fit (the agreement settled first, as evaluation runs collectives)."""
        self._agreement.settle()  # no stop proposal in flight across evaluation's collectives
        return self._evaluate(loader, when)

    def _record_step_evaluation(self, logs: dict[str, float]) -> None:
        """A step evaluation in the history (with its step) and a plateau scheduler's step: before the
        callbacks see it, so that a checkpoint they save holds it (as an epoch end's does)."""
        self.state.record({**logs, "eval_step": self.global_step}, self._history_keys + ("eval_step",))
        step_plateau(self.scheduler, self.config.scheduler_monitor, logs)

    def _step_epoch_scheduler(self, logs: dict[str, float]) -> None:
        cfg = self.config
        if self.scheduler is not None and cfg.scheduler_interval == "epoch":
            step_epoch_scheduler(self.scheduler, cfg.scheduler_monitor, logs, self.eval_every_n_steps is not None)

    def _where(self, batch_idx: int) -> str:
        return f"optimizer step {self.global_step + 1} (epoch {self.epoch}, batch {batch_idx})"

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, loader: Iterable) -> dict[str, float]:
        """Loss, accuracy (classification with a criterion) and ``metrics`` over exactly the loader's
        samples, as ``val_*`` keys, identical on every rank."""
        return self._evaluate(loader, "evaluate")

    def _evaluate(self, loader: Iterable, when: str) -> dict[str, float]:
        self.callbacks.call("on_evaluate_begin", trainer=self, logs={"when": when})
        metrics = self._evaluator(self._compiled, self._loaders.eval(loader))
        if when == "step":
            self._record_step_evaluation(metrics)
        self.callbacks.call("on_evaluate_end", trainer=self, logs={
            **metrics, "when": when, "epoch": self.epoch, "global_step": self.global_step})
        return metrics

    def predict(self, loader: Iterable, main_process_only: bool = False) -> torch.Tensor | None:
        """The model's outputs (``logits`` of a ``ModelOutput``) for every sample once, in dataset order,
        on every rank (on rank 0 only with ``main_process_only``); see ``prediction.py`` for the memory."""
        return predict(self._compiled, self._loaders.eval(loader), self.criterion is not None and
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
        self._loader_state = LoaderState(self.rank, self.world_size, self.state)
        self._rng_state = RNGState(self.rank)
        shared = {"model": ModelState(self.module), "optimizer": self.optimizer, "scaler": self.precision,
                  "train_state": self.state, "callbacks": self.callbacks}
        if self.scheduler is not None:
            shared["scheduler"] = self.scheduler
        own = {"rng": self._rng_state, "epoch_sums": self.epoch_sums, "loader": self._loader_state}
        cfg = self.config
        sharded = fsdp.sharded_states(shared, self.module, self.optimizer, cfg.strategy, cfg.async_checkpoint)
        return checkpoint.RunState(shared, own, ready_to_save=lambda: check_window_closed(self.module, self.state),
                                   sharded=sharded)

    def save_checkpoint(self, path: str | os.PathLike, **metadata: Any) -> Path:
        """Save everything needed to continue this run exactly to ``path``; call it on **every rank**.

        Rank 0 alone writes (atomically: a crash leaves the old file or the new one), after gathering
        every rank's RNG state; all ranks return once the file is complete. ``metadata`` (numbers,
        strings, tensors, lists, dicts) comes back from ``load_checkpoint``. See docs/checkpoints.md.
        """
        return self.checkpoints.save(path, metadata)

    def save_in_dir(self, dirpath: str | os.PathLike, name: str | None = None, **metadata: Any) -> Path:
        """Save to ``dirpath/name.ckpt`` (``step-<global step>.ckpt`` when name is None) and point ``latest`` at it."""
        return self.checkpoints.save_in_dir(dirpath, name, metadata)

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore a checkpoint on **every rank** (each rank its own RNG streams); return its metadata."""
        return self.checkpoints.load(path)

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, scheduler, scaler, train_state, callbacks (no RNG). FSDP: collective, fsdp.whole_states."""
        return {name: obj.state_dict() for name, obj in fsdp.whole_states(self.run_state).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, obj in fsdp.whole_states(self.run_state).items():
            if name in state:
                obj.load_state_dict(state[name])

    # ------------------------------------------------------------------ teardown
    def release_distributed(self) -> None:
        """Finish an asynchronous save, drop the DDP wrapper (before the process group goes)."""
        checkpoints = getattr(self, "checkpoints", None)  # absent when __init__ failed before it
        if checkpoints is not None:
            checkpoints.wait()
        self.model = self._compiled

    def close(self) -> None:
        """Release DDP and destroy the process group if this Trainer created it. Also runs at exit."""
        self.release_distributed()
        if self.created_process_group:
            process_group.teardown()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _fail(self, exc: BaseException) -> None:
        """``fit`` raised: the callbacks' ``on_exception``, then the group goes; a collective that timed out
        is raised again as an error naming the ranks that never arrived (``dist/timeouts.py``)."""
        self.callbacks.call_on_exception(exc, trainer=self)
        stuck = timeouts.never_arrived(exc, self.config.dist_timeout)
        self._abort()
        if stuck is not None:
            raise stuck from exc

    def _abort(self) -> None:
        # Closing our group makes peers blocked in a collective fail fast instead of waiting for the timeout.
        if self.created_process_group and self.world_size > 1:
            self.close()


def save_in_dir(trainer: Trainer, dirpath: str | os.PathLike, name: str | None = None, **metadata: Any) -> Path:
    """``trainer.save_in_dir(...)``, as a function (call it on every rank)."""
    return trainer.save_in_dir(dirpath, name, **metadata)
