"""anndist: one training loop from one CPU to many GPU nodes, built on DistributedDataParallel."""
from .batch import split_batch, to_device
from .callbacks import (PREEMPTED_EXIT_CODE, Callback, CallbackError, CallbackList, LoggingCallback,
                        MetricsCallback, ModelCheckpoint, PreemptionCallback, ProfilingCallback, ProgressBarCallback,
                        TensorBoardCallback)
from .checkpoint import latest_checkpoint, save_in_dir
from .checkpoint_file import CheckpointError
from .env import DistEnv, detect_env
from .optimization import NonFiniteLossError
from .seed import seed_everything
from .trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "Trainer", "Callback", "CallbackList", "CallbackError", "LoggingCallback", "seed_everything",
    "MetricsCallback", "ProfilingCallback", "ProgressBarCallback", "TensorBoardCallback",
    "DistEnv", "detect_env", "NonFiniteLossError", "split_batch", "to_device", "__version__",
    "ModelCheckpoint", "CheckpointError", "save_in_dir", "latest_checkpoint",
    "PreemptionCallback", "PREEMPTED_EXIT_CODE",
]
