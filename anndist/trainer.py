"""The Trainer: any model, optimizer and loss, from one process to many nodes.

Read ``fit`` top to bottom: per epoch, per micro-batch: forward and backward (inside the strategy's
``no_sync`` except on the last micro-batch of an accumulation window), then one optimizer step per
window (``step/train_step.py``). How the model is placed on the ranks (one process, DDP, FSDP) is the
strategy's (``strategies/``): the Trainer asks it and never tests for a kind of model. Where the run
is lives in ``self.state`` (``step/train_state.py``); what a checkpoint holds is ``self.run_state``, a
set of objects with ``state_dict()`` that the checkpoint code saves and restores without knowing the
Trainer. Everything else (logging, checkpoints, profiling, preemption) lives in callbacks.
"""
from __future__ import annotations

import logging
import os
import time
from functools import partial
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import checkpoint, log
from .callbacks.base import Callback
from .callbacks.defaults import build_callbacks
from .callbacks.model_checkpoint import checkpoint_folder
from .checkpoint.manager import CheckpointManager, check_window_closed
from .checkpoint.states import ModelState, whole_states
from .config import TrainerConfig
from .data.batch import split_batch
from .data.epoch_reader import epoch_position, micro_batches
from .data.global_batch import accumulation_steps, epoch_shape
from .data.loaders import LoaderState, RankLoaders, resumes_by_index, start_position
from .data.sampler import start_epoch
from .dist import collectives, process_group
from .dist.agreement import StopAgreement
from .dist.device import default_device
from .dist.env import DistEnv, detect_env
from .dist.flight_recorder import enable_flight_recorder
from .evaluation.evaluator import Evaluator
from .evaluation.prediction import predict
from .seed import RNGState, rank_seed, seed_everything
from .step.loss import LossStep, call_on_inputs, model_loss
from .step.optimization import OptimizerStep, step_epoch_scheduler, step_plateau
from .step.plan import RunPlan
from .step.spike_guard import SpikeGuard
from .step.precision import make_precision
from .step.train_state import EpochSums, TrainState
from .step.train_step import TrainStep
from .strategies import Strategy, make_strategy

logger = logging.getLogger(__name__)
HISTORY_KEYS = ("train_loss", "val_loss", "val_accuracy")


class Trainer:
    """Trains ``model`` with ``optimizer``: on ``criterion(outputs, targets)``, on the loss the model
    computes itself (no criterion), or on ``compute_loss``; placed on the ranks by ``strategy``."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: Callable | None = None,
        callbacks: Sequence[Callback] | None = None, *,
        # the step
        gradient_accumulation_steps: int | None = None, global_batch_size: int | None = None,
        max_grad_norm: float | None = None, use_amp: bool = False, amp_dtype: str | torch.dtype | None = None,
        compute_loss: Callable | None = None, on_nonfinite: str = "error", spike_guard: bool | SpikeGuard = False,
        scheduler: Any = None, scheduler_interval: str = "step", scheduler_monitor: str = "val_loss",
        # evaluation
        metrics: dict[str, Any] | None = None, metric_inputs: Callable | None = None,
        # placement
        strategy: str = "ddp", ddp_kwargs: dict[str, Any] | None = None, fsdp_kwargs: dict[str, Any] | None = None,
        shard_modules: Callable[[nn.Module], bool] | None = None, compile: bool | dict[str, Any] = False,
        device: str | torch.device | None = None, backend: str | None = None,
        dist_timeout: float | timedelta = timedelta(minutes=10),
        # data
        seed: int | None = None, rebuild_train_loader: bool = True, rebuild_eval_loader: bool = True,
        # checkpoints
        checkpoint_dir: str | os.PathLike | None = None, auto_resume: bool = False, async_checkpoint: bool = False,
        # run control
        handle_signals: bool = True, watchdog_timeout: float | None = None, stop_check_period: float = 0.25,
        progress_bar: bool | None = None,
        **unknown: Any,
    ) -> None:
        """The options are keyword-only, in sections as above; each is documented on ``TrainerConfig``
        (``help(anndist.TrainerConfig)``) and in docs/training.md, and checked here before anything starts."""
        self.config = cfg = TrainerConfig.validated(model, optimizer, criterion, locals(), unknown)
        self.optimizer, self.criterion, self.scheduler = optimizer, criterion, cfg.scheduler
        self._init_distributed(cfg)
        self.strategy: Strategy = make_strategy(cfg, self.device, self.rank, self.world_size)
        self.strategy.setup(model, optimizer)
        process_group.register_releaser(self)
        if cfg.seed is not None:  # once the weights are the same on every rank
            seed_everything(rank_seed(cfg.seed, self.rank))
        self.precision = make_precision(cfg.amp_dtype, self.device)
        self.callbacks = build_callbacks(callbacks, cfg, self.rank)
        self.state = TrainState(self.strategy.data_world_size, cfg.seed, cfg.gradient_accumulation_steps or 1,
                                cfg.global_batch_size)
        self.epoch_sums = EpochSums(self.rank, self.world_size, self.device)
        self._init_steps(cfg)
        self.run_state = self._make_run_state()
        self.checkpoints = CheckpointManager(self.run_state, self.state, cfg.checkpoint_dir,
                                             lambda: checkpoint_folder(cfg.checkpoint_dir, self.callbacks),
                                             cfg.auto_resume)
        if cfg.spike_guard is not None:  # off by default, and then not even a test on the step's path
            self._step.guard(cfg.spike_guard, self.state, self.checkpoints.roll_back)
        self._loaders = RankLoaders(self.strategy.data_world_size, self.strategy.data_rank, cfg.seed or 0,
                                    cfg.rebuild_train_loader, cfg.rebuild_eval_loader, cfg.global_batch_size)
        self.stop_training = False
        self._plan: RunPlan | None = None
        self._val_loader: Iterable | None = None

    def _init_distributed(self, cfg: TrainerConfig) -> None:
        """The device, the process group (created when the launcher asks for several ranks), the rank."""
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

    def _init_steps(self, cfg: TrainerConfig) -> None:
        """The training step, the evaluation and the stop agreement."""
        step_scheduler = cfg.scheduler is not None and cfg.scheduler_interval == "step"
        self._optimizer_step = OptimizerStep(self.optimizer, self.precision, cfg.scheduler, step_scheduler,
                                             cfg.max_grad_norm, cfg.on_nonfinite, self.strategy)
        loss_step = self._loss_step()
        sum_reduction = getattr(self.criterion, "reduction", "mean") == "sum"
        self._step = TrainStep(self.strategy, LossStep(self.criterion, loss_step, self.device), self.precision,
                               self._optimizer_step, self.epoch_sums, (cfg.gradient_accumulation_steps or 1, sum_reduction),
                               cfg.seed if cfg.global_batch_size else None)  # a global batch: dropout by piece
        self._evaluator = Evaluator(self.criterion, loss_step, cfg.metrics, cfg.metric_inputs, self.device,
                                    self.precision)
        self.metrics = self._evaluator.metrics
        self._history_keys = HISTORY_KEYS + tuple(f"val_{name}" for name in self.metrics)
        self._agreement = StopAgreement(self.device, cfg.stop_check_period)

    # ------------------------------------------------------------------ the model, as the strategy placed it
    module = property(lambda self: self.strategy.module,
                      doc="The user's module (sharded in place under FSDP); its state_dict() is what checkpoints hold.")
    model = property(lambda self: self.strategy.train_module,
                     doc="What a training micro-batch calls: the DDP wrapper under DDP, else the (compiled) module.")

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
        self._step.k = self.state.accumulation_steps = accumulation_steps(  # before the resume, which rescales
            self.config.global_batch_size, self.config.gradient_accumulation_steps, train_loader, self.strategy.data_world_size)
        self.checkpoints.resume(resume_from)
        loader = self._loaders.train(train_loader)
        self._plan, self._val_loader, self.stop_training = plan, val_loader, False
        try:
            self.callbacks.call("on_train_begin", trainer=self, logs={
                "num_epochs": num_epochs, "max_steps": max_steps, "start_epoch": self.epoch})
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
            self.callbacks.call_on_exception(exc, trainer=self)
            self._abort()
            raise
        finally:
            self._plan = self._val_loader = None
        return self.history

    def _train_epoch(self, loader: Iterable) -> dict[str, float] | None:
        """Train one epoch and evaluate; None when a stop cut the epoch short (no ``on_epoch_end``)."""
        epoch, started, skip = self.epoch, time.perf_counter(), start_position(loader, self.state, self._loader_state)
        if isinstance(loader, DataLoader):  # set_epoch, and the resume offset of a loader anndist rebuilt
            start_epoch(loader, epoch, self.config.seed or 0, self.rank, skip if resumes_by_index(loader) else 0)
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
        cbs, state, k = self.callbacks, self.state, self._step.k
        self._step.begin_epoch(epoch_shape(loader, state.epoch, first_idx))
        equal = resumes_by_index(loader) or (self.world_size == 1 and self._loader_state.loader is None)
        batches = self._rng_state.iterate(loader)  # a resumed run's RNG streams are set around iter()
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
        """Evaluate inside fit; a step evaluation is recorded (with its step) and steps a plateau scheduler."""
        self._agreement.settle()  # no stop proposal in flight across evaluation's collectives
        logs = self._evaluate(loader, when)
        if when == "step":
            self.state.record({**logs, "eval_step": self.global_step}, self._history_keys + ("eval_step",))
            step_plateau(self.scheduler, self.config.scheduler_monitor, logs)
        return logs

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
        strategy = self.strategy
        metrics = self._evaluator(strategy.forward_module, strategy.eval_batches(self._loaders.eval(loader)))
        self.callbacks.call("on_evaluate_end", trainer=self, logs={
            **metrics, "when": when, "epoch": self.epoch, "global_step": self.global_step})
        return metrics

    def predict(self, loader: Iterable, main_process_only: bool = False) -> torch.Tensor | None:
        """The model's outputs (``logits`` of a ``ModelOutput``) for every sample once, in dataset order,
        on every rank (on rank 0 only with ``main_process_only``); see ``prediction.py`` for the memory."""
        loader = self._loaders.eval(loader)
        with_criterion = self.criterion is not None and self.config.compute_loss is None
        return predict(self.strategy.forward_module, loader, self.strategy.eval_batches(loader), with_criterion,
                       self.device, self.precision, main_process_only)

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
        self._rng_state = RNGState(self.rank, self.state)
        shared = {"model": ModelState(self.module), "optimizer": self.optimizer, "scaler": self.precision,
                  "train_state": self.state, "callbacks": self.callbacks}
        if self.scheduler is not None:
            shared["scheduler"] = self.scheduler
        own = {"rng": self._rng_state, "epoch_sums": self.epoch_sums, "loader": self._loader_state}
        sharded = self.strategy.checkpoint_states(shared, self.optimizer)  # may take model and optimizer out
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
        """Model, optimizer, scheduler, scaler, train_state, callbacks (no RNG); whole even where the strategy
        shards (then a collective, gathered to rank 0: see checkpoint/states.py ``whole_states``)."""
        return {name: obj.state_dict() for name, obj in whole_states(self.run_state).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, obj in whole_states(self.run_state).items():
            if name in state:
                obj.load_state_dict(state[name])

    # ------------------------------------------------------------------ teardown
    def release_distributed(self) -> None:
        """Finish an asynchronous save, drop the DDP wrapper (before the process group goes)."""
        checkpoints = getattr(self, "checkpoints", None)  # absent when __init__ failed before it
        if checkpoints is not None:
            checkpoints.wait()
        strategy = getattr(self, "strategy", None)
        if strategy is not None:
            strategy.release()

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


def save_in_dir(trainer: Trainer, dirpath: str | os.PathLike, name: str | None = None, **metadata: Any) -> Path:
    """``trainer.save_in_dir(...)``, as a function (call it on every rank)."""
    return trainer.save_in_dir(dirpath, name, **metadata)
