"""Trainer options, validated at construction so mistakes surface before any training starts."""
from __future__ import annotations

import difflib
import inspect
import math
import numbers
import os
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checks import check_count
from .strategies.compile import check_compile
from .dist.env import detect_env
from .strategies.fsdp import check_options
from .step.optimization import NONFINITE_POLICIES
from .step.precision import resolve_amp_dtype
from .dist.process_group import check_backend
from .preflight.trainer_check import check_preflight_option
from .seed import check_seed


@dataclass
class TrainerConfig:
    """Every keyword option of ``Trainer``.

    use_amp / amp_dtype: autocast forward and loss; ``"bf16"`` (default where supported) or ``"fp16"``
        (or ``torch.bfloat16`` / ``torch.float16``).
    gradient_accumulation_steps: micro-batches per optimizer step (one all-reduce per step).
    max_grad_norm: clip the global gradient norm (after unscaling) once per step.
    scheduler / scheduler_interval / scheduler_monitor: an LR scheduler stepped per optimizer step
        (``"step"``) or per epoch (``"epoch"``; ``ReduceLROnPlateau`` is given ``scheduler_monitor``).
    on_nonfinite: ``"error"`` stops with an error naming step and ranks; ``"skip"`` skips such steps.
    seed: reproducible runs; each rank gets its own stream (seed + rank) once the weights are in sync.
    device / backend / dist_timeout: override the device (``cuda:LOCAL_RANK`` or CPU; ``"cuda"`` without
        an index means ``cuda:LOCAL_RANK``), the backend (NCCL for CUDA, gloo for CPU) and the collective
        timeout (seconds or a timedelta) of a group the Trainer creates.
    rebuild_train_loader / rebuild_eval_loader: shard stock-sampler loaders across ranks (see sampler.py).
    ddp_kwargs: extra keyword arguments for ``DistributedDataParallel``, over ``DDP_DEFAULTS``.
    strategy / fsdp_kwargs / shard_modules: ``"ddp"`` (default) replicates the model on every rank;
        ``"fsdp"`` shards parameters, gradients and optimizer state with FSDP2's ``fully_shard``
        (``fsdp_kwargs`` are its keyword arguments; ``shard_modules(m) -> bool`` picks the submodules
        that get their own shard group); see fsdp.py and docs/fsdp.md.
    async_checkpoint: checkpoints are DCP folders (as under ``strategy="fsdp"``, also with ``"ddp"``),
        staged in memory and written in the background while training goes on (checkpoint/sharded.py).
    progress_bar: a tqdm bar on rank 0; None (default) shows it when stderr is a terminal and not under CI.
    checkpoint_dir / auto_resume: the folder of checkpoints (``fit(resume_from="latest")`` and
        ``ModelCheckpoint()`` use it); with ``auto_resume=True`` the first ``fit`` resumes from its latest
        checkpoint when there is one, which is what SLURM requeues and torchrun restarts need.
    stop_check_period: seconds between the cross-rank agreements on ``stop_training`` (0: after every
        optimizer step). The default 0.25 makes that all-reduce rare when steps are small and fast
        (one per step cost 5-10% of the digits step on 2 quiet gloo ranks, 0.6 ms per all-reduce on a
        busy 2-core machine); a stop takes effect within about the period, still at the same step on
        every rank. Steps slower than the period agree after every step.
    compute_loss: ``compute_loss(model, batch) -> loss | (loss, num_items)`` replaces the loss step (the
        batch is on the device; ``model`` is the DDP wrapper when distributed); with ``num_items``,
        accumulation weighs every item equally across micro-batches and ranks (see accumulation.py).
    metrics: ``{"name": metric}``, objects with ``update(preds, targets)``, ``compute()``, ``reset()``
        (torchmetrics works as it is), reported as ``val_<name>``, exact over the dataset on any ranks.
    metric_inputs: ``metric_inputs(outputs, batch) -> (preds, targets)`` for the metrics; by default
        the outputs and targets (criterion), else the output's ``logits`` and the batch's ``labels``.
    watchdog_timeout: seconds without a micro-batch starting or ending (or an evaluation) after which every
        rank dumps its threads' stacks to ``<checkpoint_dir or cwd>/watchdog-rank{r}.txt`` and the job ends
        naming the rank(s) that did not reach the collective (``callbacks/watchdog.py``); on NCCL it also turns
        on PyTorch's flight recorder, dumped to the same folder. None (default): off, because a legitimately slow
        step, evaluation or save longer than any default would end a healthy run; set it above the longest.
    handle_signals: install a ``PreemptionCallback`` (SIGUSR1/SIGTERM: stop all ranks at the same step,
        checkpoint, requeue on SLURM, exit 75) unless ``callbacks`` holds one; see docs/slurm.md.
    compile: ``True`` or a dict of ``torch.compile`` options compiles the bare module before DDP wraps it;
        training, evaluation and predict call the compiled module, checkpoints hold the original module's
        keys (no ``_orig_mod.``); see compiling.py and docs/compile.md.
    preflight: ``True`` checks the job's nodes once the process group exists (software, layout, compute,
        links, checkpoint_dir; ``anndist/preflight/``) and warns; ``"strict"`` raises if a rank fails or lags.
    """

    use_amp: bool = False
    amp_dtype: Any = None  # after validation: a torch.dtype or None
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    scheduler: Any = None
    scheduler_interval: str = "step"
    scheduler_monitor: str = "val_loss"
    on_nonfinite: str = "error"
    seed: int | None = None
    device: Any = None
    backend: str | None = None
    dist_timeout: timedelta = timedelta(minutes=10)
    rebuild_train_loader: bool = True
    rebuild_eval_loader: bool = True
    ddp_kwargs: dict = field(default_factory=dict)
    strategy: str = "ddp"
    fsdp_kwargs: dict = field(default_factory=dict)
    shard_modules: Any = None
    async_checkpoint: bool = False
    progress_bar: bool | None = None
    checkpoint_dir: Any = None  # after validation: a pathlib.Path or None
    auto_resume: bool = False
    stop_check_period: float = 0.25
    handle_signals: bool = True
    watchdog_timeout: float | None = None
    compute_loss: Any = None
    metrics: Any = None  # after validation: a dict
    metric_inputs: Any = None
    compile: Any = False  # after validation: a dict of torch.compile options, or None
    preflight: Any = False  # False, True or "strict"
    sum_reduction: bool = False  # derived: criterion.reduction == "sum"

    @classmethod
    def from_options(cls, model: Any, optimizer: Any, criterion: Any, options: dict[str, Any]) -> "TrainerConfig":
        known = {f.name for f in fields(cls)} - {"sum_reduction"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"Trainer got unknown option(s) {unknown}; valid options are {sorted(known)}")
        _check_model_optimizer_criterion(model, optimizer, criterion)
        cfg = cls(**options)
        cfg._validate(optimizer)
        cfg.sum_reduction = getattr(criterion, "reduction", "mean") == "sum"
        return cfg

    def _validate(self, optimizer: torch.optim.Optimizer) -> None:
        check_count("gradient_accumulation_steps", self.gradient_accumulation_steps, minimum=1)
        if self.max_grad_norm is not None and not (isinstance(self.max_grad_norm, numbers.Real) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm={self.max_grad_norm!r} must be a positive number or None")
        _check_choice("scheduler_interval", self.scheduler_interval, ("step", "epoch"))
        _check_choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        if self.progress_bar is not None and not isinstance(self.progress_bar, bool):
            raise TypeError(f"progress_bar must be True, False or None (auto), got {self.progress_bar!r}")
        if isinstance(self.stop_check_period, bool) or not isinstance(self.stop_check_period, numbers.Real) \
                or not 0 <= self.stop_check_period < float("inf"):
            raise ValueError(f"stop_check_period={self.stop_check_period!r} must be a number of seconds >= 0 "
                             "(0 agrees on stop_training after every optimizer step)")
        self._validate_loss_and_metrics()
        if not isinstance(self.handle_signals, bool):
            raise TypeError(f"handle_signals must be True or False, got {type(self.handle_signals).__name__} "
                            f"{self.handle_signals!r}")
        self._validate_scheduler(optimizer)
        wd = self.watchdog_timeout
        if wd is not None and (isinstance(wd, bool) or not isinstance(wd, numbers.Real)):
            raise TypeError(f"watchdog_timeout must be a number of seconds or None (off), got {type(wd).__name__} {wd!r}")
        if wd is not None and not 0 < wd < float("inf"):
            raise ValueError(f"watchdog_timeout={wd!r} must be a positive, finite number of seconds or None, e.g. 600")
        self.compile = check_compile(self.compile)
        self.preflight = check_preflight_option(self.preflight)
        if self.seed is not None:
            check_seed(self.seed)
        self._validate_distributed()
        self._validate_checkpointing()
        if not isinstance(self.use_amp, bool):  # "no" would be truthy and turn AMP on
            raise TypeError(f"use_amp must be True or False, got {type(self.use_amp).__name__} {self.use_amp!r}")
        self.amp_dtype = resolve_amp_dtype(self.use_amp, self.amp_dtype, self.device or _probe_device())
        check_options(self.strategy, self.fsdp_kwargs, self.shard_modules, self.amp_dtype, self.async_checkpoint)

    def _validate_scheduler(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scheduler is None:
            return
        missing = [m for m in ("step", "state_dict", "load_state_dict") if not callable(getattr(self.scheduler, m, None))]
        if missing:
            raise TypeError(f"scheduler ({type(self.scheduler).__name__}) has no {missing}; pass a "
                            "torch.optim.lr_scheduler scheduler or an object with step(), state_dict() and "
                            "load_state_dict() (a checkpoint saves and restores it)")
        if getattr(self.scheduler, "optimizer", optimizer) is not optimizer:
            raise ValueError("scheduler was built on another optimizer; build it on the Trainer's optimizer")
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and self.scheduler_interval != "epoch":
            raise ValueError("ReduceLROnPlateau steps on a metric once per epoch; pass scheduler_interval='epoch'")

    def _validate_distributed(self) -> None:
        """device, backend, dist_timeout, ddp_kwargs: checked here even in one process, where they go unused."""
        self.device = _resolve_device(self.device)
        check_backend(self.backend)
        self.dist_timeout = _timeout(self.dist_timeout)
        _check_ddp_kwargs(self.ddp_kwargs)

    def _validate_loss_and_metrics(self) -> None:
        for name in ("compute_loss", "metric_inputs"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be a function, got {type(value).__name__} {value!r}")
        metrics = {} if self.metrics is None else self.metrics
        if not isinstance(metrics, dict):
            raise TypeError(f"metrics must be a dict of name -> metric, got {type(metrics).__name__}; "
                            "e.g. metrics={'f1': MulticlassF1Score(num_classes)}")
        for name, metric in metrics.items():
            if not isinstance(name, str) or not name.isidentifier() or name in ("loss", "accuracy"):
                raise ValueError(f"metrics name {name!r} must be an identifier other than 'loss' and 'accuracy' "
                                 "(it is reported as val_<name>)")
            missing = [m for m in ("update", "compute", "reset") if not callable(getattr(metric, m, None))]
            if missing:
                raise TypeError(f"metrics[{name!r}] ({type(metric).__name__}) has no {missing}; a metric needs "
                                "update(preds, targets), compute() and reset(), as torchmetrics' metrics have")
        self.metrics = dict(metrics)

    def _validate_checkpointing(self) -> None:
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, (str, os.PathLike)):
                raise TypeError(f"checkpoint_dir must be a path or None, got "
                                f"{type(self.checkpoint_dir).__name__} {self.checkpoint_dir!r}")
            if not os.fspath(self.checkpoint_dir):
                raise ValueError("checkpoint_dir='' is empty (it would mean the working directory); pass a folder "
                                 "such as checkpoint_dir='runs/exp1', or None for no checkpoints")
            self.checkpoint_dir = Path(self.checkpoint_dir)
        if not isinstance(self.auto_resume, bool):
            raise TypeError(f"auto_resume must be True or False, got {self.auto_resume!r}")
        if self.auto_resume and self.checkpoint_dir is None:
            raise ValueError("auto_resume=True needs checkpoint_dir=...: the folder to look for checkpoints in")


def _resolve_device(device: Any) -> torch.device | None:
    """``device`` as a torch.device; ``"cuda"`` without an index is this process's GPU, ``cuda:LOCAL_RANK``."""
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"device={device!r} is not a device ({exc}); pass e.g. 'cuda', 'cuda:0' or 'cpu', "
                         "or None for cuda:LOCAL_RANK when there is a GPU, else the CPU") from None
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but this machine has no CUDA device (torch.cuda.is_available() is "
                           "False: no GPU, or a CPU-only torch); pass device='cpu' or leave device out")
    if resolved.index is None:  # torch.cuda.set_device and DDP need an index; one GPU per local rank
        resolved = torch.device("cuda", detect_env(os.environ).local_rank % torch.cuda.device_count())
    return resolved


def _timeout(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):  # True would be one second
        raise TypeError(f"dist_timeout must be a number of seconds or a timedelta, got {type(value).__name__} {value!r}")
    else:
        seconds = float(value)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"dist_timeout={value!r} must be a positive, finite number of seconds or timedelta, "
                         "e.g. 600 or timedelta(minutes=10)")
    return value if isinstance(value, timedelta) else timedelta(seconds=seconds)


_SET_BY_TRAINER = ("module", "device_ids")

# DDP options the Trainer passes unless ddp_kwargs says otherwise. Gradients as views into DDP's
# all-reduce buckets: after each all-reduce DDP hands the reduced bucket over as the gradients instead
# of copying it back into them, one gradient-sized copy less per optimizer step (timed alone: 4 ms
# for the large benchmark model, whose 2-process CPU step is ~350 ms; bit-identical weights).
# anndist never detaches a reduced gradient, the one thing views forbid;
# ddp_kwargs={"gradient_as_bucket_view": False} restores DDP's own default.
DDP_DEFAULTS = {"gradient_as_bucket_view": True}


def _check_ddp_kwargs(ddp_kwargs: Any) -> None:
    """Keys DistributedDataParallel would refuse only once there are two ranks, refused now."""
    if not isinstance(ddp_kwargs, dict):
        raise TypeError(f"ddp_kwargs must be a dict of DistributedDataParallel keyword arguments, got "
                        f"{type(ddp_kwargs).__name__}; e.g. ddp_kwargs={{'find_unused_parameters': True}}")
    parameters = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return  # a DDP that takes any keyword: nothing to check against
    accepted = [name for name in parameters if name != "self" and name not in _SET_BY_TRAINER]
    for key in ddp_kwargs:
        if key in _SET_BY_TRAINER:
            raise ValueError(f"ddp_kwargs key {key!r} is set by the Trainer (from the model and device=...); "
                             "remove it, and pass device='cuda:N' to choose the GPU")
        if key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TypeError(f"ddp_kwargs key {key!r} is not a parameter of DistributedDataParallel; {hint}"
                            f"it takes {accepted}")


def _probe_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _check_model_optimizer_criterion(model: Any, optimizer: Any, criterion: Callable) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}; wrap your function in an nn.Module")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("model is already wrapped in DistributedDataParallel; pass the bare module, the Trainer wraps it")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if criterion is not None and not callable(criterion):
        raise TypeError(f"criterion must be callable as criterion(outputs, targets) or None (the model computes "
                        f"its own loss), got {type(criterion).__name__}")
    model_params = {id(p) for p in model.parameters()}
    foreign = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in model_params)
    if foreign:
        raise ValueError(
            f"optimizer holds {foreign} parameter(s) that are not parameters of model; build it with "
            "optimizer = Optimizer(model.parameters(), ...) on the same model you pass to the Trainer"
        )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")
