"""anndist: one training loop from one CPU to many GPU nodes, with DDP or FSDP placing the model."""
from .data.batch import split_batch, to_device
from .callbacks import (PREEMPTED_EXIT_CODE, Callback, CallbackError, CallbackList, EarlyStopping, LoggingCallback,
                        MetricsCallback, ModelCheckpoint, PreemptionCallback, ProfilingCallback, ProgressBarCallback,
                        StragglerCallback, TensorBoardCallback, MLflowCallback, WandbCallback)
from .checkpoint import CheckpointError, latest_checkpoint
from .config import TrainerConfig
from .dist.env import DistEnv, detect_env
from .step.optimization import NonFiniteLossError
from .step.spike_guard import SpikeGuard
from .optional import MissingDependencyError
from .preflight import run_preflight
from .seed import seed_everything
from .trainer import Trainer, save_in_dir
from .version import __version__
from .data import sampler_hint

sampler_hint.install()  # a DistributedSampler built before the Trainer: torch's error says what to do

__all__ = [
    "Trainer", "TrainerConfig", "Callback", "CallbackList", "CallbackError", "LoggingCallback", "seed_everything",
    "MetricsCallback", "ProfilingCallback", "ProgressBarCallback", "TensorBoardCallback",
    "DistEnv", "detect_env", "NonFiniteLossError", "split_batch", "to_device", "__version__",
    "ModelCheckpoint", "CheckpointError", "save_in_dir", "latest_checkpoint",
    "PreemptionCallback", "PREEMPTED_EXIT_CODE", "MissingDependencyError",
    "EarlyStopping", "MLflowCallback", "WandbCallback", "StragglerCallback", "run_preflight", "SpikeGuard",
    "Conv1DColwise", "Conv1DRowwise",
]


def __getattr__(name: str):
    """The Conv1D tensor-parallel styles, imported on first use (torch's tensor-parallel package is slow to load)."""
    if name in ("Conv1DColwise", "Conv1DRowwise"):
        from .strategies import conv1d
        return getattr(conv1d, name)
    raise AttributeError(f"module 'anndist' has no attribute {name!r}")
