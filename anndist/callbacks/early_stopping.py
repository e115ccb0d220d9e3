"""EarlyStopping: stop a run when a monitored global metric has stopped improving.

The decision is taken on the global metric (``val_*`` and ``train_loss`` are reduced over all ranks
and identical on every rank), so every rank counts the same evaluations, reaches ``patience`` at
the same one and sets ``trainer.stop_training`` at the same hook: all ranks stop after the same
optimizer step, without a collective of this callback's own.

It judges each evaluation of ``fit``: in epoch mode at ``on_epoch_end`` (whose logs hold the
epoch's train loss and val metrics); in step mode (``fit(eval_every_n_steps=N)``) at
``on_evaluate_end`` when ``logs["when"] == "step"``. ``trainer.evaluate()`` outside ``fit`` is never
counted. The counter, the best value and where it was reached are the callback's ``state_dict()``,
saved in every checkpoint, so a resumed or requeued run goes on counting where it was saved.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..dist import collectives
from .base import Callback
from .monitoring import check_monitor, step_mode

if TYPE_CHECKING:
    from ..trainer import Trainer

logger = logging.getLogger(__name__)
MODES = ("min", "max")


class EarlyStopping(Callback):
    """Stop training after ``patience`` evaluations in a row without an improvement of ``monitor``.

    monitor: a global metric of the evaluation logs, such as ``"val_loss"``, ``"val_accuracy"``,
        ``"val_<name>"`` for ``Trainer(metrics={name: ...})``, or (epoch mode only) ``"train_loss"``.
    patience: how many evaluations in a row may fail to improve before the run stops.
    mode: ``"min"`` (lower is better, losses) or ``"max"`` (higher is better, accuracies).
    min_delta: an evaluation improves (and restarts the count) only when it beats the value of the
        last improvement by more than this (>= 0). A NaN or infinite value never improves. ``best`` is
        the best value itself, however small its lead: the run's one best, the one the closing line
        and ``ModelCheckpoint(monitor=...)`` report.
    restore_best_weights: at the end of ``fit``, load the weights of the best evaluation into
        ``trainer.module``. Every rank keeps a CPU copy of ``trainer.module.state_dict()`` taken at
        each new best, and the copy is part of this callback's ``state_dict()``, so it survives a
        requeue: that doubles the size of every checkpoint (and adds one model's size of host memory
        per rank). The weights are restored when this callback stopped the run or when ``fit`` ran
        to its end; not when another callback stopped it (a preemption, whose checkpoint must hold
        the latest weights to resume from).

    After ``fit``: ``best`` (the best value), ``best_step`` / ``best_epoch`` (where it was reached),
    ``wait`` (evaluations since the last improvement by more than ``min_delta``) and ``stopped_step``
    (the optimizer step after which this callback stopped the run, or None). A fit that starts with
    the patience already spent (a run resumed from a checkpoint saved after the stop) stops at once;
    use a new ``EarlyStopping`` to train further.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 3, mode: str = "min", min_delta: float = 0.0,
                 restore_best_weights: bool = False) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(
                f"monitor must be a metric name such as 'val_loss', got {type(monitor).__name__} {monitor!r}")
        if isinstance(patience, bool) or not isinstance(patience, int):
            raise TypeError(f"patience must be an int (evaluations without improvement), got "
                            f"{type(patience).__name__} {patience!r}")
        if patience < 1:
            raise ValueError(
                f"patience={patience} must be >= 1: the evaluations in a row without improvement before stopping")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {list(MODES)}; 'min' for losses, 'max' for accuracies")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)):
            raise TypeError(f"min_delta must be a number, got {type(min_delta).__name__} {min_delta!r}")
        if not (math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(
                f"min_delta={min_delta!r} must be a finite number >= 0 (the margin an improvement must beat)")
        if not isinstance(restore_best_weights, bool):
            raise TypeError(f"restore_best_weights must be True or False, got {restore_best_weights!r}")
        self.monitor, self.patience, self.mode = monitor, patience, mode
        self.min_delta, self.restore_best_weights = float(min_delta), restore_best_weights
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_epoch: int | None = None
        self.reference: float | None = None  # the value of the last improvement by more than min_delta
        self.wait = 0
        self.stopped_step: int | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self._stopped_this_fit = False

    # ---------------------------------------------------------------- hooks
    def on_train_begin(self, trainer: "Trainer", logs: dict | None = None) -> None:
        check_monitor("EarlyStopping", self.monitor, trainer, logs)
        self._stopped_this_fit = False
        if not trainer.is_main_process and self.best_weights:  # restored from a checkpoint: rank 0's copy serves
            self.best_weights = {}
        if self.wait >= self.patience:  # restored from a checkpoint saved after the stop: every rank alike
            logger.info("EarlyStopping: %s has not improved for %d evaluations since step %s; stopping at once "
                        "(use a new EarlyStopping to train further)", self.monitor, self.wait, self.best_step)
            self._stop(trainer)

    def on_evaluate_end(self, trainer: "Trainer", logs: dict | None = None) -> None:
        logs = logs or {}
        if logs.get("when") == "step":  # step mode: each evaluation inside fit counts here
            self._judge(trainer, logs, logs.get("epoch", trainer.epoch))

    def on_epoch_end(self, epoch: int, trainer: "Trainer", logs: dict | None = None) -> None:
        if not step_mode(trainer):  # epoch mode: once per epoch
            self._judge(trainer, logs or {}, epoch)

    def on_train_end(self, trainer: "Trainer", logs: dict | None = None) -> None:
        # Another callback's stop (a preemption) is followed by a checkpoint that must resume the
        # latest weights, so only our own stop or a complete fit restores the best ones.
        if (self.restore_best_weights and self.best_weights is not None and self.best_step != trainer.global_step
                and (self._stopped_this_fit or not trainer.stop_training)):
            load_whole_state_dict(trainer.module, self.best_weights)
            logger.info("EarlyStopping: restored the weights of step %d (%s %.6g)", self.best_step, self.monitor,
                        self.best)

    # ---------------------------------------------------------------- the decision
    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the last improvement by more than ``min_delta`` (NaN/inf never does)."""
        return self._beats(value, self.reference, self.min_delta)

    def _beats(self, value: float, than: float | None, margin: float) -> bool:
        if not math.isfinite(value):
            return False
        if than is None:
            return True
        return value < than - margin if self.mode == "min" else value > than + margin

    def _judge(self, trainer: "Trainer", logs: dict, epoch: int) -> None:
        if self.monitor not in logs:
            where = "step-mode evaluation" if logs.get("when") == "step" else "epoch"
            numbers = sorted(k for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            raise ValueError(
                f"EarlyStopping(monitor={self.monitor!r}): not among this {where}'s metrics {numbers}; pass a "
                "val_loader to fit() for val_* metrics, or monitor one of those")
        value = float(logs[self.monitor])
        if self._beats(value, self.best, 0.0):
            self.best, self.best_step, self.best_epoch = value, trainer.global_step, epoch
            if self.restore_best_weights:
                self.best_weights = whole_state_dict(trainer.module)
        if self.improves(value):
            self.reference, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            logger.info("EarlyStopping: %s has not improved for %d evaluations (best %.6g at step %d); stopping "
                        "after step %d", self.monitor, self.wait, self.best if self.best is not None else math.nan,
                        self.best_step if self.best_step is not None else -1, trainer.global_step)
            self._stop(trainer)

    def _stop(self, trainer: "Trainer") -> None:
        self.stopped_step = trainer.global_step
        self._stopped_this_fit = True
        trainer.stop_training = True

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The counter and the best evaluation; plus the best weights with ``restore_best_weights``."""
        state: dict[str, Any] = {"monitor": self.monitor, "mode": self.mode, "best": self.best,
                                 "best_step": self.best_step, "best_epoch": self.best_epoch, "wait": self.wait,
                                 "reference": self.reference,
                                 "stopped_step": self.stopped_step}
        if self.restore_best_weights:
            state["best_weights"] = self.best_weights
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("monitor"), state.get("mode")) != (self.monitor, self.mode):
            logger.warning("EarlyStopping: the checkpoint counted monitor=%r mode=%r, this one monitors %r (%s); "
                           "counting starts afresh", state.get("monitor"), state.get("mode"), self.monitor, self.mode)
            return
        self.best, self.best_step, self.best_epoch = state["best"], state["best_step"], state["best_epoch"]
        self.wait, self.stopped_step = state["wait"], state["stopped_step"]
        self.reference = state.get("reference", self.best)  # a checkpoint from before the two differed
        weights = state.get("best_weights")
        self.best_weights = ({k: v.to("cpu") for k, v in weights.items()}
                             if self.restore_best_weights and weights is not None else None)


def whole_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the whole model's weights, on rank 0 (other ranks get ``{}``); call it on every rank.

    Under FSDP the shards are gathered (each rank's own shard would be saved from rank 0 alone and
    then loaded into every rank); replicated weights are simply copied on rank 0.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # A model on the CPU may get its own tensors back (nothing to offload), which training goes on changing.
    on_cpu = all(p.device.type == "cpu" for p in module.parameters())
    return {key: value.detach().clone() if on_cpu else value.detach() for key, value in state.items()}


def load_whole_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load rank 0's ``whole_state_dict`` into every rank (each keeps its shard under FSDP); every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    broadcast = collectives.is_initialized() and collectives.world_size() > 1
    # An evaluation can leave a sharded root's parameters gathered; state_dict()'s pre-hook registers the
    # shards again, which the load must find (it copies into the parameters it finds first).
    module.state_dict()
    set_model_state_dict(module, dict(state),  # a copy: the load replaces the dict's values with its own
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast))
