"""Experiment trackers (MLflow, Weights & Biases): the run's global records, sent by rank 0.

Both are :class:`MetricsCallback` subclasses, so the values are the ones of the log lines (reduced
over all ranks on logging steps only) and nothing here adds a collective: ``open``, ``write`` and
``close`` run on rank 0 alone. Each record becomes metrics named ``train/<name>`` (step records),
``epoch/<name>`` (epoch records) or ``eval/<name>`` (evaluations in step mode and ``evaluate()``
outside ``fit``), at the record's ``step``, the optimizer step over the whole run.

One training run is one tracker run. The tracker's run id is the callback's ``state_dict()``, so it
is saved in every checkpoint (rank 0's copy) and restored on every rank by a resume: a torchrun
restart or a SLURM requeue, a new process that loads the checkpoint, continues the SAME tracker run
with increasing steps instead of opening a new one per attempt (or per rank). A run resumed from a
checkpoint older than its last record re-trains steps whose records the tracker already holds (bit-exact
resume makes them the same values); they are not sent twice: ``MLflowCallback`` reads the run's last
logged step when it reopens a run and skips records up to it; W&B drops steps below its current one
itself. Parameters (world size, accumulation, clipping, optimizer, ...) are logged once, when the
tracker run is created.

The tracker packages are optional extras, imported on rank 0 when a run opens:
``pip install 'anndist[mlflow]'`` (``mlflow-skinny`` is enough) or ``'anndist[wandb]'``.
"""
from __future__ import annotations

import logging
import os
import socket
import urllib.parse
from typing import TYPE_CHECKING, Any

import torch

from ..optional import require_installed
from ..version import __version__
from .metrics import MetricsCallback
from .sender import Sender

if TYPE_CHECKING:
    from ..trainer import Trainer

logger = logging.getLogger(__name__)

GROUPS = {"step": "train", "epoch": "epoch", "eval": "eval"}  # start records carry no metric
NOT_METRICS = ("kind", "time", "epoch", "step")
WANDB_MODES = ("online", "offline", "disabled")
REACH_TIMEOUT_S = 10.0  # W&B online: a server that does not accept a connection by then is unreachable


class TrackerCallback(MetricsCallback):
    """The part both trackers share: records as ``<group>/<name>`` metrics, the run id as state, and
    every call to the tracker on a thread of its own (``sender.py``), so that a tracker that is slow,
    unreachable or failing never holds training up or ends it: failures are logged once, and the end
    of ``fit`` waits at most ``close_timeout`` seconds for what is still queued.

    A subclass implements ``_start(run_id, params) -> run_id`` (continue ``run_id`` when it is not
    None, else create a run and log ``params``), ``_log(metrics, step, time)``,
    ``_last_logged_step() -> int`` (-1 when unknown) and ``_finish(failed)``; all run on rank 0's
    sender thread, one at a time, in the order the training thread asked for them.
    """

    package = extra = ""
    QUEUE_LIMIT = 10_000  # calls waiting for a slow tracker; past it records are dropped, never waited for

    def __init__(self, log_interval: int, close_timeout: float = 30.0) -> None:
        super().__init__(log_interval)
        if isinstance(close_timeout, bool) or not isinstance(close_timeout, (int, float)):
            raise TypeError(f"close_timeout must be a number of seconds, got {type(close_timeout).__name__} "
                            f"{close_timeout!r}")
        if not 0 < close_timeout < float("inf"):
            raise ValueError(f"close_timeout={close_timeout!r} must be a positive, finite number of seconds (how long "
                             "the end of fit waits for the tracker)")
        require_installed(self.package, type(self).__name__)  # one line; imported on rank 0 when a run opens
        self.close_timeout = float(close_timeout)
        self.run_id: str | None = None
        self._reopen_after_load = False  # a run id restored from a checkpoint: earlier attempts logged steps
        self._skip_up_to = -1  # records of fit() at steps <= this are already in the tracker
        self._failed = False
        self._started = False  # the sender's view: the tracker run is open
        self._sender: Sender | None = None  # rank 0's, made at the first open

    # ---------------------------------------------------------------- MetricsCallback's writer
    def open(self, trainer: "Trainer") -> None:
        self._failed = False
        self._send(self._open, run_params(trainer, self.log_interval))  # read here, on the training thread

    def write(self, record: dict[str, Any]) -> None:
        if GROUPS.get(record["kind"]) is not None:
            self._send(self._write, record, self._in_fit)

    def close(self) -> None:
        self._send(self._close, self._failed)
        self._flush()

    def on_exception(self, exc: BaseException, trainer: "Trainer", logs: dict | None = None) -> None:
        self._failed = True
        super().on_exception(exc, trainer, logs)

    # ---------------------------------------------------------------- on the sender's thread
    def _open(self, params: dict[str, Any]) -> None:
        resumed, self._started = self.run_id is not None, False
        self.run_id = self._start(self.run_id, params)
        self._started = True
        if resumed and self._reopen_after_load:
            self._skip_up_to = self._last_logged_step()
        self._reopen_after_load = False

    def _write(self, record: dict[str, Any], in_fit: bool) -> None:
        if not self._started or (in_fit and record["step"] <= self._skip_up_to):
            return
        metrics = {f"{GROUPS[record['kind']]}/{name}": float(value) for name, value in record.items()
                   if name not in NOT_METRICS and value is not None}
        self._log(metrics, record["step"], record["time"])

    def _close(self, failed: bool) -> None:
        self._skip_up_to = -1
        if self._started:
            self._started = False
            self._finish(failed)

    # ---------------------------------------------------------------- the sender
    def _send(self, fn: Any, *args: Any) -> None:
        if self._sender is None:
            self._sender = Sender(type(self).__name__, self.QUEUE_LIMIT)
        self._sender.call(fn, *args)

    def _flush(self) -> None:
        """Wait at most ``close_timeout`` for the queued calls; leave the rest to the sender thread."""
        if self._sender is not None and not self._sender.wait(self.close_timeout):
            logger.warning("%s: the tracker did not take the last %d call(s) within close_timeout=%g s; they are "
                           "left to it, and training goes on", type(self).__name__, self._sender.pending(),
                           self.close_timeout)

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The tracker run's id (rank 0's is saved; None before the first ``fit``, and until the tracker
        answered its first call: a checkpoint taken before then resumes into a new tracker run)."""
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")
        self._reopen_after_load = self.run_id is not None

    # ---------------------------------------------------------------- for subclasses
    def _start(self, run_id: str | None, params: dict[str, Any]) -> str:
        raise NotImplementedError

    def _log(self, metrics: dict[str, float], step: int, time: float) -> None:
        raise NotImplementedError

    def _last_logged_step(self) -> int:
        return -1

    def _finish(self, failed: bool) -> None:
        raise NotImplementedError


class MLflowCallback(TrackerCallback):
    """Log the run to MLflow: ``tracking_uri`` (``file:<folder>`` or a folder path, ``sqlite:///...``, ``http://...``),
    under ``experiment`` (created if missing), as one MLflow run named ``run_name`` (MLflow picks a
    name when None).

    MLflow 3 puts its file store (``file:`` URIs) in maintenance mode and refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE=true``; for a ``file:`` URI this callback sets that variable in rank 0's
    environment when it is unset (an explicit ``false`` is respected). The client is an
    ``MlflowClient`` of its own: MLflow's global active run is left alone. The run ends ``FINISHED``
    after each ``fit`` (``FAILED`` when ``fit`` raised) and is set back to ``RUNNING`` by a resume.
    """

    package, extra = "mlflow", "mlflow"

    def __init__(self, tracking_uri: str | os.PathLike = "file:runs/mlruns", experiment: str = "anndist",
                 run_name: str | None = None, log_interval: int = 10, close_timeout: float = 30.0) -> None:
        if not isinstance(tracking_uri, (str, os.PathLike)):
            raise TypeError(f"tracking_uri must be a URI such as 'file:runs/mlruns' or a folder, got "
                            f"{type(tracking_uri).__name__} {tracking_uri!r}")
        _check_name("experiment", experiment, required=True)
        _check_name("run_name", run_name)
        super().__init__(log_interval, close_timeout)
        # A path object is a folder for the file store; a string goes to MLflow as it is.
        self.tracking_uri = tracking_uri if isinstance(tracking_uri, str) else f"file:{os.fspath(tracking_uri)}"
        self.experiment, self.run_name = experiment, run_name
        self._client: Any = None

    def _start(self, run_id: str | None, params: dict[str, Any]) -> str:
        if _is_file_store(self.tracking_uri):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._client = client = MlflowClient(tracking_uri=self.tracking_uri)
        if run_id is not None:
            try:
                client.update_run(run_id, status="RUNNING")
                return run_id
            except MlflowException as exc:
                logger.warning("MLflowCallback: cannot continue run %s from the checkpoint (%s); starting a new run",
                               run_id, exc)
                self._reopen_after_load = False
        experiment = client.get_experiment_by_name(self.experiment)
        try:
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.experiment)
        except MlflowException:  # another job created it meanwhile
            experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
        run = client.create_run(experiment_id, run_name=self.run_name, tags={"anndist.version": __version__})
        client.log_batch(run.info.run_id, params=[Param(key, str(value)) for key, value in params.items()])
        return run.info.run_id

    def _log(self, metrics: dict[str, float], step: int, time: float) -> None:
        from mlflow.entities import Metric

        millis = int(time * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(key, value, millis, step)
                                                     for key, value in metrics.items()])

    def _last_logged_step(self) -> int:
        keys = self._client.get_run(self.run_id).data.metrics
        steps = [m.step for key in keys for m in self._client.get_metric_history(self.run_id, key)]
        return max(steps, default=-1)

    def _finish(self, failed: bool) -> None:
        if self._client is not None and self.run_id is not None:
            self._client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
        self._client = None


class WandbCallback(TrackerCallback):
    """Log the run to Weights & Biases: ``project``, ``mode`` (``"offline"`` by default: compute nodes
    often have no internet; ``wandb sync DIR/wandb/offline-run-*`` uploads later), files under
    ``dir`` (W&B's default, the working folder, when None), run display name ``run_name``.

    A resume calls ``wandb.init(id=<saved id>, resume="allow")``: online, the same run continues; in
    offline mode each attempt (process) writes its own ``offline-run-<time>-<id>`` folder with the
    same id, and ``wandb sync`` merges them into one run. The callback's run is its own
    (``reinit="create_new"``), so a run the script opened itself is left alone.

    The run stays open after ``fit`` so that a later ``fit`` or ``evaluate()`` in the same process
    logs to it without starting another attempt (``wandb.init`` takes seconds, and two attempts
    started within the same second would share an offline folder); W&B finishes it when the process
    exits, or call :meth:`finish`. A ``fit`` that raises finishes it at once, as failed.
    """

    package, extra = "wandb", "wandb"

    def __init__(self, project: str, mode: str = "offline", dir: str | os.PathLike | None = None,
                 run_name: str | None = None, log_interval: int = 10, close_timeout: float = 30.0) -> None:
        _check_name("project", project, required=True)
        if mode not in WANDB_MODES:
            raise ValueError(f"mode={mode!r} is not one of {list(WANDB_MODES)}")
        if dir is not None and not isinstance(dir, (str, os.PathLike)):
            raise TypeError(f"dir must be a path (str or os.PathLike) or None, got {type(dir).__name__} {dir!r}")
        _check_name("run_name", run_name)
        super().__init__(log_interval, close_timeout)
        self.project, self.mode, self.run_name = project, mode, run_name
        self.dir = os.fspath(dir) if dir is not None else None
        self.run: Any = None

    def _start(self, run_id: str | None, params: dict[str, Any]) -> str:
        import wandb

        if self.run is not None:  # still open in this process
            return self.run.id
        if self.dir is not None:
            os.makedirs(self.dir, exist_ok=True)
        options: dict[str, Any] = {"project": self.project, "mode": self.mode, "dir": self.dir, "name": self.run_name,
                                   "reinit": "create_new"}
        if self.mode == "online":
            options["mode"] = self._online_or_offline(wandb.setup().settings.base_url)
        if run_id is None:
            self.run = wandb.init(config=params, **options)
        else:
            self.run = wandb.init(id=run_id, resume="allow", **options)
        return self.run.id

    def _online_or_offline(self, server: str) -> str:
        """``"online"``, or ``"offline"`` when the W&B server cannot be reached: the records are then kept on
        disk for ``wandb sync`` instead of being retried for minutes (and again at the process's exit)."""
        problem = unreachable(server, REACH_TIMEOUT_S)
        if problem is None:
            return "online"
        logger.warning("WandbCallback: the W&B server %s cannot be reached (%s); logging offline to %s instead "
                       "(wandb sync uploads it later)", server, problem, os.path.join(self.dir or ".", "wandb"))
        return "offline"

    def _log(self, metrics: dict[str, float], step: int, time: float) -> None:
        self.run.log(metrics, step=step)

    def _finish(self, failed: bool) -> None:
        if failed:
            self._finish_run(1)

    def finish(self, exit_code: int = 0) -> None:
        """Finish the W&B run now, after the records still queued (rank 0; a no-op elsewhere); waits at
        most ``close_timeout`` seconds. A later ``fit`` resumes it by id."""
        if self._sender is not None:
            self._send(self._finish_run, exit_code)
            self._flush()

    def _finish_run(self, exit_code: int) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.finish(exit_code=exit_code)


def run_params(trainer: "Trainer", log_interval: int) -> dict[str, Any]:
    """What a tracker run records once, at its creation: cheap facts about the job."""
    cfg, optimizer = trainer.config, trainer.optimizer
    return {
        "world_size": trainer.world_size, "gradient_accumulation_steps": trainer.state.accumulation_steps,
        "max_grad_norm": cfg.max_grad_norm, "amp_dtype": str(cfg.amp_dtype).replace("torch.", ""),
        "seed": cfg.seed, "optimizer": type(optimizer).__name__, "lr": float(optimizer.param_groups[0]["lr"]),
        "param_groups": len(optimizer.param_groups),
        "scheduler": type(trainer.scheduler).__name__ if trainer.scheduler is not None else None,
        "model": type(trainer.module).__name__,
        "parameters": sum(p.numel() for p in trainer.module.parameters()), "device": trainer.device.type,
        "log_interval": log_interval, "anndist": __version__, "torch": torch.__version__,
    }


def unreachable(url: str, timeout: float) -> str | None:
    """Why nothing answers a TCP connection to ``url``'s host and port within ``timeout`` s (None: it does)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _is_file_store(uri: str) -> bool:
    """``file:...`` or a bare folder (no scheme), which MLflow also reads as a file store."""
    return uri.startswith("file:") or ("://" not in uri and ":" not in uri and not uri.startswith("databricks"))


def _check_name(argument: str, value: Any, required: bool = False) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or not value:
        raise TypeError(f"{argument} must be a non-empty string{'' if required else ' or None'}, "
                        f"got {type(value).__name__} {value!r}")
