"""The Trainer's options after validation: ``TrainerConfig``, built once when the Trainer is built.

Every option is checked here, before any process group, model placement or training starts, so a
mistake surfaces at once with an error that names the option, the value and the fix. Each field of
``TrainerConfig`` keeps one type after validation (``amp_dtype`` a ``torch.dtype`` or None,
``checkpoint_dir`` a ``Path`` or None, ``compile`` a dict of torch.compile options or None, ...); the
defaults and what each option does are in ``Trainer.__init__``'s signature and docstring.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .checks import check_count, unknown_options_error
from .dist.env import detect_env
from .dist.process_group import check_backend
from .preflight.trainer_check import check_preflight_option
from .seed import check_seed
from .step.optimization import NONFINITE_POLICIES
from .step.precision import resolve_amp_dtype
from .step.spike_guard import SpikeGuard, make_spike_guard
from .strategies import check_strategy_options
from .strategies.activation_checkpointing import check_activation_checkpointing
from .strategies.compile import check_compile
from .strategies.tp_plan import check_tp_options


@dataclass(frozen=True)
class TrainerConfig:
    """The Trainer's options, validated, one type per field; read it as ``trainer.config``. The
    defaults are in ``Trainer.__init__``'s signature.

    The step: ``gradient_accumulation_steps`` micro-batches per optimizer step (one gradient reduction
        per step; None: 1, or what ``global_batch_size`` makes it); ``global_batch_size`` samples per
        optimizer step over every data-parallel rank, the same samples in the same steps on any number
        of ranks (K follows from the loader's batch size; docs/elastic.md); ``max_grad_norm`` clips
        the global gradient norm once per step; ``use_amp`` / ``amp_dtype`` autocast the forward and
        loss (``"bf16"``, the default where supported, or ``"fp16"`` with a gradient scaler);
        ``compute_loss(model, batch) -> loss | (loss, num_items)`` replaces the loss step, and with
        ``num_items`` accumulation weighs every item equally across micro-batches and ranks;
        ``on_nonfinite``: ``"error"`` stops naming the step and ranks, ``"skip"`` skips such steps;
        ``spike_guard`` (True or a ``SpikeGuard``) skips steps whose global loss spikes and rolls back
        after several in a row (step/spike_guard.py); ``scheduler`` is stepped per optimizer step or
        per epoch (``scheduler_interval``; ``ReduceLROnPlateau`` is given ``scheduler_monitor``).
    Evaluation: ``metrics`` ``{"name": metric}`` (``update``/``compute``/``reset``, as torchmetrics'),
        reported as ``val_<name>``, exact over the dataset on any ranks; ``metric_inputs(outputs, batch)
        -> (preds, targets)`` (default: outputs and targets, or ``logits`` and the batch's ``labels``).
    Placement: ``strategy`` ``"ddp"`` (replicas) or ``"fsdp"`` (FSDP2 shards; ``fsdp_kwargs`` for
        FSDP2's sharding call, ``shard_modules(m) -> bool`` picks the submodules with their own shard group);
        ``ddp_kwargs`` for DistributedDataParallel; ``tp_size`` ranks split each layer of ``tp_plan``
        (``{"fc1": "colwise", "fc2": "rowwise"}``, patterns, torch ParallelStyles; a transformers model's
        own plan without it), the strategy then acting across those groups (docs/parallelism.md);
        ``activation_checkpointing`` (True: the blocks of the main ModuleList; or ``fn(module) -> bool``)
        recomputes activations in the backward; ``compile`` (True or torch.compile options) compiles
        where the strategy should; ``device`` (default ``cuda:LOCAL_RANK`` or the CPU), ``backend``
        (NCCL for CUDA, gloo for CPU) and ``dist_timeout`` of a process group the Trainer creates.
    Data: ``seed`` makes runs reproducible (each rank its own stream); ``rebuild_train_loader`` /
        ``rebuild_eval_loader`` shard stock-sampler loaders across ranks (data/sampler.py).
    Checkpoints: ``checkpoint_dir`` (``fit(resume_from="latest")``, ``ModelCheckpoint()``); with
        ``auto_resume`` the first ``fit`` resumes from its latest checkpoint (SLURM requeues, torchrun
        restarts); ``async_checkpoint`` writes DCP folders in the background while training goes on.
    Run control: ``handle_signals`` installs a ``PreemptionCallback`` (SIGUSR1/SIGTERM: stop all ranks
        at the same step, checkpoint, requeue, exit 75); ``watchdog_timeout`` seconds without progress
        dump every rank's stacks and end the job naming the missing ranks (off by default: set it above
        the longest step, evaluation or save); ``stop_check_period`` seconds between the ranks'
        agreements on ``stop_training``; ``progress_bar`` a tqdm bar on rank 0 (None: when stderr is a
        terminal and not under CI); ``preflight`` (True, or ``"strict"`` to raise) checks the job's nodes
        once the process group exists: software, layout, compute, links, checkpoint_dir (docs/slurm.md);
        ``log_epochs`` prints a line per epoch (and per step-mode evaluation) and the run's closing line
        on rank 0 when no ``LoggingCallback`` is given.
    See docs/training.md for each in full.
    """

    # the step
    gradient_accumulation_steps: int | None  # None only with global_batch_size: K follows at fit()
    global_batch_size: int | None
    max_grad_norm: float | None
    use_amp: bool
    amp_dtype: torch.dtype | None
    compute_loss: Callable | None
    on_nonfinite: str
    spike_guard: SpikeGuard | None
    scheduler: Any
    scheduler_interval: str
    scheduler_monitor: str
    # evaluation
    metrics: dict[str, Any]
    metric_inputs: Callable | None
    # placement
    strategy: str
    ddp_kwargs: dict[str, Any]
    fsdp_kwargs: dict[str, Any]
    shard_modules: Callable | None
    tp_size: int
    tp_plan: dict[str, Any] | None
    activation_checkpointing: Callable[[nn.Module], bool] | None
    compile: dict[str, Any] | None
    device: torch.device | None
    backend: str | None
    dist_timeout: timedelta
    # data
    seed: int | None
    rebuild_train_loader: bool
    rebuild_eval_loader: bool
    # checkpoints
    checkpoint_dir: Path | None
    auto_resume: bool
    async_checkpoint: bool
    # run control
    handle_signals: bool
    watchdog_timeout: float | None
    stop_check_period: float
    progress_bar: bool | None
    preflight: bool | str
    log_epochs: bool

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def validated(cls, model: Any, optimizer: Any, criterion: Any, arguments: Mapping[str, Any],
                  unknown: Mapping[str, Any]) -> "TrainerConfig":
        """Check the Trainer's arguments (``arguments``: its options by name; ``unknown``: keywords it
        does not take) and return them with one type per option."""
        _check_unknown(unknown, cls.names())
        _check_model_optimizer_criterion(model, optimizer, criterion)
        v = {name: arguments[name] for name in cls.names()}
        _check_step(v, optimizer)
        _check_loss_and_metrics(v)
        _check_run_control(v)
        v["compile"] = check_compile(v["compile"])
        v["preflight"] = check_preflight_option(v["preflight"])
        if v["seed"] is not None:
            check_seed(v["seed"])
        v["device"] = _resolve_device(v["device"])
        check_backend(v["backend"])
        v["dist_timeout"] = _timeout(v["dist_timeout"])
        _check_checkpointing(v)
        for name in ("use_amp", "rebuild_train_loader", "rebuild_eval_loader", "async_checkpoint", "log_epochs"):
            _check_bool(name, v[name])  # "no" would be truthy
        v["amp_dtype"] = resolve_amp_dtype(v["use_amp"], v["amp_dtype"], v["device"] or _probe_device())
        for name in ("ddp_kwargs", "fsdp_kwargs"):
            v[name] = {} if v[name] is None else v[name]
        check_strategy_options(v["strategy"], v["ddp_kwargs"], v["fsdp_kwargs"], v["shard_modules"], v["amp_dtype"])
        v["ddp_kwargs"], v["fsdp_kwargs"] = dict(v["ddp_kwargs"]), dict(v["fsdp_kwargs"])
        v["tp_plan"] = check_tp_options(model, v["tp_size"], v["tp_plan"], v["amp_dtype"], v["ddp_kwargs"])
        v["activation_checkpointing"] = check_activation_checkpointing(model, v["activation_checkpointing"])
        return cls(**v)


def _check_unknown(unknown: Mapping[str, Any], known: list[str]) -> None:
    if unknown:
        raise unknown_options_error("Trainer", unknown, known)


def _check_step(v: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    check_count("gradient_accumulation_steps", v["gradient_accumulation_steps"], minimum=1, optional=True)
    check_count("global_batch_size", v["global_batch_size"], minimum=1, optional=True)
    if v["global_batch_size"] is None and v["gradient_accumulation_steps"] is None:
        v["gradient_accumulation_steps"] = 1
    v["spike_guard"] = make_spike_guard(v["spike_guard"])
    norm = v["max_grad_norm"]
    if norm is not None and (isinstance(norm, bool) or not isinstance(norm, numbers.Real) or not norm > 0):
        raise ValueError(f"max_grad_norm={norm!r} must be a positive number or None")
    _check_choice("scheduler_interval", v["scheduler_interval"], ("step", "epoch"))
    _check_choice("on_nonfinite", v["on_nonfinite"], NONFINITE_POLICIES)
    _check_scheduler(v["scheduler"], v["scheduler_interval"], optimizer)


def _check_scheduler(scheduler: Any, interval: str, optimizer: torch.optim.Optimizer) -> None:
    if scheduler is None:
        return
    missing = [m for m in ("step", "state_dict", "load_state_dict") if not callable(getattr(scheduler, m, None))]
    if missing:
        raise TypeError(f"scheduler ({type(scheduler).__name__}) has no {missing}; pass a "
                        "torch.optim.lr_scheduler scheduler or an object with step(), state_dict() and "
                        "load_state_dict() (a checkpoint saves and restores it)")
    if getattr(scheduler, "optimizer", optimizer) is not optimizer:
        raise ValueError("scheduler was built on another optimizer; build it on the Trainer's optimizer")
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and interval != "epoch":
        raise ValueError("ReduceLROnPlateau steps on a metric once per epoch; pass scheduler_interval='epoch'")


def _check_loss_and_metrics(v: dict[str, Any]) -> None:
    for name in ("compute_loss", "metric_inputs"):
        value = v[name]
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be a function, got {type(value).__name__} {value!r}")
    metrics = {} if v["metrics"] is None else v["metrics"]
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
    v["metrics"] = dict(metrics)


def _check_run_control(v: dict[str, Any]) -> None:
    if v["progress_bar"] is not None and not isinstance(v["progress_bar"], bool):
        raise TypeError(f"progress_bar must be True, False or None (auto), got {v['progress_bar']!r}")
    period = v["stop_check_period"]
    if isinstance(period, bool) or not isinstance(period, numbers.Real) or not 0 <= period < float("inf"):
        raise ValueError(f"stop_check_period={period!r} must be a number of seconds >= 0 "
                         "(0 agrees on stop_training after every optimizer step)")
    _check_bool("handle_signals", v["handle_signals"])
    wd = v["watchdog_timeout"]
    if wd is not None and (isinstance(wd, bool) or not isinstance(wd, numbers.Real)):
        raise TypeError(f"watchdog_timeout must be a number of seconds or None (off), got {type(wd).__name__} {wd!r}")
    if wd is not None and not 0 < wd < float("inf"):
        raise ValueError(f"watchdog_timeout={wd!r} must be a positive, finite number of seconds or None, e.g. 600")


def _check_checkpointing(v: dict[str, Any]) -> None:
    folder = v["checkpoint_dir"]
    if folder is not None:
        if not isinstance(folder, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir must be a path or None, got {type(folder).__name__} {folder!r}")
        if not os.fspath(folder):
            raise ValueError("checkpoint_dir='' is empty (it would mean the working directory); pass a folder "
                             "such as checkpoint_dir='runs/exp1', or None for no checkpoints")
        v["checkpoint_dir"] = Path(folder)
    _check_bool("auto_resume", v["auto_resume"])
    if v["auto_resume"] and folder is None:
        raise ValueError("auto_resume=True needs checkpoint_dir=...: the folder to look for checkpoints in")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


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
