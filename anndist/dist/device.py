"""Which device a rank trains on when the user does not say."""
from __future__ import annotations

import torch

from .env import DistEnv


def default_device(env: DistEnv) -> torch.device:
    """``cuda:LOCAL_RANK`` (modulo the visible GPUs) when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")
