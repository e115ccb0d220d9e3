"""The model and Trainer of the FSDP tests (one process and 2 ranks)."""
import torch
from torch import nn

from anndist import Trainer


def deep_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def fsdp_trainer(seed: int) -> Trainer:
    model = deep_model(seed)
    return Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), nn.CrossEntropyLoss(), strategy="fsdp",
                   shard_modules=lambda m: isinstance(m, nn.Linear), seed=0, progress_bar=False, handle_signals=False)
