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

from .callbacks.base import Callback
from .callbacks.defaults import build_callbacks
from .callbacks.model_checkpoint import checkpoint_folder
from .checks import check_keywords
from .checkpoint.manager import CheckpointManager
from .checkpoint.methods import CheckpointMethods
from .config import TrainerConfig
from .data.batch import split_batch
from .data.epoch_reader import epoch_position, micro_batches
from .data.loaders import RankLoaders, resumes_by_index, start_position
from .data.sampler import start_epoch
from .dist import process_group, timeouts
from .dist.agreement import StopAgreement
from .dist.join import join
from .evaluation.evaluator import Evaluator
from .evaluation.prediction import predict
from .preflight.trainer_check import preflight_trainer
from .seed import rank_seed, seed_everything
from .step.loss import LossStep, call_on_inputs, choose_loss_step, model_loss
from .step.optimization import OptimizerStep, step_epoch_scheduler, step_plateau
from .step.plan import RunPlan
from .step.spike_guard import SpikeGuard
from .step.precision import make_precision
from .step.train_state import EpochSums, TrainState
from .step.train_step import TrainStep
from .strategies import Strategy, make_strategy

logger = logging.getLogger(__name__)
HISTORY_KEYS = ("train_loss", "val_loss", "val_accuracy")


class Trainer(CheckpointMethods):
    """Trains ``model`` with ``optimizer``: on ``criterion(outputs, targets)``, on the loss the model
    computes itself (no criterion), or on ``compute_loss``; placed on the ranks by ``strategy``.
    Its checkpoint methods (``save_checkpoint``, ``load_checkpoint``, ``state_dict``, ...) are in
    checkpoint/methods.py."""

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
        shard_modules: Callable[[nn.Module], bool] | None = None, tp_size: int = 1,
        tp_plan: dict[str, Any] | None = None, activation_checkpointing: bool | Callable[[nn.Module], bool] = False,
        compile: bool | dict[str, Any] = False,
        device: str | torch.device | None = None, backend: str | None = None,
        dist_timeout: float | timedelta = timedelta(minutes=10),
        # data
        seed: int | None = None, rebuild_train_loader: bool = True, rebuild_eval_loader: bool = True,
        # checkpoints
        checkpoint_dir: str | os.PathLike | None = None, auto_resume: bool = False, async_checkpoint: bool = False,
        # run control
        handle_signals: bool = True, watchdog_timeout: float | None = None, stop_check_period: float = 0.25,
        progress_bar: bool | None = None, preflight: bool | str = False, log_epochs: bool = True,
        **unknown: Any,
    ) -> None:
        """The options are keyword-only, in sections as above; each is documented on ``TrainerConfig``
        (``help(anndist.TrainerConfig)``) and in docs/training.md, and checked here before anything starts."""
        self.config = cfg = TrainerConfig.validated(model, optimizer, criterion, locals(), unknown)
        self.optimizer, self.criterion, self.scheduler = optimizer, criterion, cfg.scheduler
        joined = join(cfg, owner=self)  # the device, the process group (created when several ranks are asked for)
        self.env, self.device, self.created_process_group = joined.env, joined.device, joined.created
        self.rank, self.world_size, self.is_main_process = joined.rank, joined.world_size, joined.rank == 0
        self.local_rank = self.env.local_rank if self.env.is_distributed else 0
        self.strategy: Strategy = make_strategy(cfg, self.device, self.rank, self.world_size)
        self.strategy.setup(model, optimizer)
        process_group.register_releaser(self)
        if cfg.seed is not None:  # once the weights are the same on every rank
            seed_everything(rank_seed(cfg.seed, self.strategy.data_rank))  # one stream per tensor-parallel group
        self.precision = make_precision(cfg.amp_dtype, self.device)
        self.callbacks = build_callbacks(callbacks, cfg, self.rank)
        self.state = TrainState(self.strategy.data_world_size, cfg.seed, cfg.gradient_accumulation_steps, cfg.global_batch_size)
        self.epoch_sums = EpochSums(self.rank, self.world_size, self.device, self.strategy.data)
        self._init_steps(cfg)
        self.run_state = self._make_run_state()
        self.checkpoints = CheckpointManager(self.run_state, self.state, cfg.checkpoint_dir,
                                             lambda: checkpoint_folder(cfg.checkpoint_dir, self.callbacks),
                                             cfg.auto_resume)
        self._step.guard(cfg.spike_guard, self.state, self.checkpoints.roll_back)  # off (None) by default
        self._loaders = RankLoaders(self.strategy.data_world_size, self.strategy.data_rank, cfg.seed or 0,
                                    cfg.rebuild_train_loader, cfg.rebuild_eval_loader, cfg.global_batch_size)
        self.stop_training = False
        self._plan: RunPlan | None = None
        self._val_loader: Iterable | None = None
        if cfg.preflight:  # every rank, once the group, the model and the folder are known
            preflight_trainer(self)

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
                                    self.precision, self.strategy.data)
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
    @check_keywords  # a misspelt keyword: "did you mean"
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
        self._step.k = self.state.count_accumulation(self.config.gradient_accumulation_steps, train_loader)  # then resume
        self.checkpoints.resume(resume_from)
        loader = self._loaders.train(train_loader)
        plan.warn_if_never_evaluating(loader, self._step.k)
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
            self.callbacks.end_run()  # the closing line, last
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
            start_epoch(loader, epoch, self.config.seed or 0, self.strategy.data_rank, skip if resumes_by_index(loader) else 0)
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
        self._step.begin_epoch(loader, state.epoch, first_idx)
        equal = resumes_by_index(loader) or (self.world_size == 1 and self._loader_state.loader is None)
        batches = self.strategy.check_batches(self._rng_state.iterate(loader))  # RNG streams set around iter()
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
    @check_keywords
    def evaluate(self, loader: Iterable) -> dict[str, float]:
        """Loss, accuracy (classification with a criterion) and ``metrics`` over exactly the loader's
        samples, as ``val_*`` keys, identical on every rank."""
        return self._evaluate(loader, "evaluate")

    def _evaluate(self, loader: Iterable, when: str) -> dict[str, float]:
        self.callbacks.call("on_evaluate_begin", trainer=self, logs={"when": when})
        strategy = self.strategy
        metrics = self._evaluator(strategy.forward_module, strategy.eval_batches(self._loaders.eval(loader)))
        if when == "step":
            self._record_step_evaluation(metrics)
        self.callbacks.call("on_evaluate_end", trainer=self, logs={
            **metrics, "when": when, "epoch": self.epoch, "global_step": self.global_step})
        return metrics

    @check_keywords
    def predict(self, loader: Iterable, main_process_only: bool = False) -> torch.Tensor | None:
        """The model's outputs (``logits`` of a ``ModelOutput``) for every sample once, in dataset order,
        on every rank (on rank 0 only with ``main_process_only``); see ``prediction.py`` for the memory."""
        loader = self._loaders.eval(loader)
        with_criterion = self.criterion is not None and self.config.compute_loss is None
        return predict(self.strategy.forward_module, loader, self.strategy.eval_batches(loader), with_criterion,
                       self.device, self.precision, main_process_only, self.strategy.data)

    def compute_loss(self, model: nn.Module, batch: Any) -> Any:
        """One micro-batch's loss, the batch already on the device: override it in a subclass (or pass
        ``compute_loss=``) to return a scalar or ``(loss, num_items)``; see ``loss.py``."""
        if self.criterion is None:
            return model_loss(model, batch)
        inputs, targets = split_batch(batch)
        return self.criterion(call_on_inputs(model, inputs), targets)

    def _loss_step(self) -> Callable | None:
        """The loss function the step calls (``step/loss.py``); None keeps the criterion's short path."""
        overridden = self.compute_loss if type(self).compute_loss is not Trainer.compute_loss else None
        k = self.config.gradient_accumulation_steps  # None with a global batch: K follows at fit(), count items
        mixes = k is None or k * self.strategy.data_world_size > 1
        return choose_loss_step(self.config.compute_loss or overridden, self.criterion, self.module, mixes)

    # ------------------------------------------------------------------ teardown
    def release_distributed(self) -> None:
        """Finish an asynchronous save, drop the DDP wrapper (before the process group goes)."""
        checkpoints = getattr(self, "checkpoints", None)  # absent when __init__ failed before it
        if checkpoints is not None:
            checkpoints.wait()
        for holder in (getattr(self, "strategy", None), getattr(self, "_step", None)):  # the step holds it too
            if holder is not None:
                holder.release()

    def close(self) -> None:
        """Release DDP; the process group anndist created goes with the last open Trainer on it (a later
        Trainer creates a new one). Also runs at exit."""
        self.release_distributed()
        process_group.release(self)

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _fail(self, exc: BaseException) -> None:
        """``fit`` raised: the callbacks' ``on_exception``, then the group goes; a collective that timed out
        is raised again as an error naming the ranks that never arrived (``dist/timeouts.py``)."""
        self.callbacks.call_on_exception(exc, trainer=self)
        stuck = timeouts.never_arrived(exc, self.config.dist_timeout)
        if self.created_process_group and self.world_size > 1:  # peers blocked in a collective fail fast
            self.release_distributed()
            process_group.teardown()
        if stuck is not None:
            raise stuck from exc


def save_in_dir(trainer: Trainer, dirpath: str | os.PathLike, name: str | None = None, **metadata: Any) -> Path:
    """``trainer.save_in_dir(...)``, as a function (call it on every rank)."""
    return trainer.save_in_dir(dirpath, name, **metadata)
