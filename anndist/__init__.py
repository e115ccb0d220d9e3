"""anndist: one training loop from one CPU to many GPU nodes, with DDP or FSDP placing the model."""
from .data.batch import split_batch, to_device
from .callbacks import (PREEMPTED_EXIT_CODE, Callback, CallbackError, CallbackList, EarlyStopping, LoggingCallback,
                        MetricsCallback, ModelCheckpoint, PreemptionCallback, ProfilingCallback, ProgressBarCallback,
                        TensorBoardCallback, MLflowCallback, WandbCallback)
from .checkpoint import CheckpointError, latest_checkpoint
from .config import TrainerConfig
from .dist.env import DistEnv, detect_env
from .step.optimization import NonFiniteLossError
from .step.spike_guard import SpikeGuard
from .optional import MissingDependencyError
from .seed import seed_everything
from .trainer import Trainer, save_in_dir
from .version import __version__

__all__ = [
    "Trainer", "TrainerConfig", "Callback", "CallbackList", "CallbackError", "LoggingCallback", "seed_everything",
    "MetricsCallback", "ProfilingCallback", "ProgressBarCallback", "TensorBoardCallback",
    "DistEnv", "detect_env", "NonFiniteLossError", "split_batch", "to_device", "__version__",
    "ModelCheckpoint", "CheckpointError", "save_in_dir", "latest_checkpoint",
    "PreemptionCallback", "PREEMPTED_EXIT_CODE", "MissingDependencyError",
    "EarlyStopping", "MLflowCallback", "WandbCallback", "SpikeGuard",
]
