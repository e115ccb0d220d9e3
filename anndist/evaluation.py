"""Evaluation over exactly the samples of a dataset, reduced over all ranks.

Each rank sums ``loss * batch_size`` (and correct predictions) over its shard; one all-reduce adds
the sums and counts, so the result equals a single process evaluating the whole dataset, to float
tolerance, whatever the world size or batch size. The bare module is used: no DDP collectives.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from . import collectives
from .batch import prepare_batch
from .precision import Precision


def is_classification(outputs: Any, targets: Any) -> bool:
    """Logits ``[N, C]`` with integer targets ``[N]``."""
    return (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)
            and outputs.dim() == 2 and targets.dim() == 1 and outputs.shape[0] == targets.shape[0]
            and not targets.is_floating_point() and not targets.is_complex())


@torch.no_grad()
def evaluate(module: torch.nn.Module, loader: Iterable, criterion: Callable, device: torch.device,
             precision: Precision, non_blocking: bool = False) -> dict[str, float]:
    """Return ``{"val_loss", "val_accuracy"?}`` over the whole dataset (accuracy for classification)."""
    # float64 sums: loss_sum, correct, samples, samples from classification batches
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    was_training = module.training
    module.eval()
    try:
        for batch in loader:
            inputs, targets, n = prepare_batch(batch, device, non_blocking)
            with precision.autocast():
                outputs = module(inputs)
                loss = criterion(outputs, targets)
            totals[0] += loss.detach().double() * n
            totals[2] += n
            if is_classification(outputs, targets):
                totals[1] += (outputs.argmax(dim=1) == targets).sum()
                totals[3] += n
    finally:
        module.train(was_training)
    collectives.all_reduce(totals)
    loss_sum, correct, samples, cls_samples = totals.tolist()
    if samples == 0:
        raise ValueError("evaluate() got a loader that yields no samples on any rank")
    metrics = {"val_loss": loss_sum / samples}
    if cls_samples == samples:
        metrics["val_accuracy"] = correct / samples
    return metrics
