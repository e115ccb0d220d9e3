"""Evaluation over exactly the samples of a dataset, reduced over all ranks.

Each rank sums ``loss * n`` (n: the batch's items when the loss step gives ``num_items``, else its
samples), and correct predictions for classification, over its shard; one all-reduce adds the sums
and counts, so the result equals a single process evaluating the whole dataset, to float tolerance,
whatever the world size or batch size. The bare module is used: no DDP collectives. Where the
forward is itself a collective (FSDP), the strategy hands over the batches in lockstep (``lockstep.py``).

Metrics (``Trainer(metrics={"f1": ...})``) see each batch's predictions and targets. A torchmetrics
``Metric`` is updated on each rank and synchronises its own states in ``compute()`` (every rank
calls it, in the same order); any other object with ``update``/``compute``/``reset`` is updated once
with the whole dataset's predictions, gathered from every rank. Either way every sample counts once
(the evaluation shards are not padded), and every rank gets the same values. The sums and gathers run
over the ranks that read different data (``data``): the ranks of a tensor-parallel group evaluate one
batch together and count it once (a torchmetrics ``Metric`` syncs over that group too).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.distributed as dist

from ..dist import collectives
from ..dist.data_layout import DataLayout
from ..data.batch import prepare_batch, split_batch, to_device
from ..step.loss import (ModelLoss, call_model, call_on_inputs, check_result, default_metric_inputs, loss_of,
                         model_output, sample_count)
from ..step.precision import Precision


def is_classification(outputs: Any, targets: Any) -> bool:
    """Logits ``[N, C]`` with integer targets ``[N]``."""
    return (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)
            and outputs.dim() == 2 and targets.dim() == 1 and outputs.shape[0] == targets.shape[0]
            and not targets.is_floating_point() and not targets.is_complex())


class Evaluator:
    """Runs the loss step (and the metrics' inputs) over a loader; see the module docstring."""

    def __init__(self, criterion: Callable | None, compute_loss: Callable | None, metrics: Mapping[str, Any],
                 metric_inputs: Callable[[Any, Any], tuple[Any, Any]] | None, device: torch.device,
                 precision: Precision, data: DataLayout | None = None) -> None:
        self.criterion, self.compute_loss = criterion, compute_loss
        # A metric that is a module (torchmetrics) keeps its states on the Trainer's device.
        self.metrics = {name: m.to(device) if isinstance(m, torch.nn.Module) else m for name, m in metrics.items()}
        self.metric_inputs, self.device, self.precision = metric_inputs, device, precision
        self.non_blocking = device.type == "cuda"
        self.group = data.group if data is not None else None

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, batches: Iterable[tuple[Any, bool]]) -> dict[str, float]:
        """The metrics over ``batches``, ``(batch, counts)`` pairs (``Strategy.eval_batches``)."""
        # float64 sums: loss_sum, correct, loss weights (items or samples), samples of classification batches
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)
        gathered: dict[str, list[tuple[Any, Any]]] = {name: [] for name in self.metrics if not _syncs_itself(self.metrics[name])}
        for metric in self.metrics.values():
            metric.reset()
        sync_buffers(module)
        was_training = module.training
        module.eval()
        try:
            for batch, counts in batches:
                self._batch(module, batch, totals, gathered, counts)
        finally:
            module.train(was_training)
        collectives.all_reduce(totals, group=self.group)
        loss_sum, correct, weight, cls_samples = totals.tolist()
        if weight == 0:
            raise ValueError("evaluate() got a loader that yields no samples on any rank")
        results = {"val_loss": loss_sum / weight}
        if cls_samples and cls_samples == weight:
            results["val_accuracy"] = correct / cls_samples
        results.update(self._compute_metrics(gathered))
        return results

    def _batch(self, module: torch.nn.Module, batch: Any, totals: torch.Tensor, gathered: dict,
               counts: bool = True) -> None:
        """Add one batch to the sums; a filler (``counts`` False, lockstep.py) runs the same forwards only."""
        with self.precision.autocast():
            if self.compute_loss is None and self.criterion is not None:
                inputs, targets, n = prepare_batch(batch, self.device, self.non_blocking)
                outputs = call_on_inputs(module, inputs)
                loss, weight = self.criterion(outputs, targets), n
            else:
                batch = to_device(batch, self.device, self.non_blocking)
                loss, weight, outputs, targets = self._custom_loss(module, batch)
        if not counts:
            if self.metrics:  # may run one more forward, as for a counted batch
                self._metric_inputs(module, batch, outputs, targets)
            return
        totals[0] += loss.detach().double() * weight
        totals[2] += weight
        if self.criterion is not None and self.compute_loss is None and is_classification(outputs, targets):
            totals[1] += (outputs.argmax(dim=1) == targets).sum()
            totals[3] += weight
        if self.metrics:
            preds, labels = self._metric_inputs(module, batch, outputs, targets)
            for name, metric in self.metrics.items():
                if name in gathered:
                    gathered[name].append((preds.detach().cpu(), labels.detach().cpu()))
                else:
                    metric.update(preds, labels)

    def _custom_loss(self, module: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, Any, Any, Any]:
        """A model that computes its own loss, or the user's compute_loss: (loss, weight, outputs, targets)."""
        if isinstance(self.compute_loss, ModelLoss):  # keep the outputs for the metrics
            outputs = model_output(module, batch)
            items = self.compute_loss.count(batch) if self.compute_loss.count is not None else None
            return loss_of(outputs), items if items is not None else sample_count(batch, False), outputs, None
        loss, num_items = check_result(self.compute_loss(module, batch))
        weight = num_items if num_items is not None else sample_count(batch, self.criterion is not None)
        return loss, weight, None, None

    def _metric_inputs(self, module: torch.nn.Module, batch: Any, outputs: Any, targets: Any) -> tuple[Any, Any]:
        if outputs is None:  # the loss step hid the outputs: one more forward, for the metrics only
            with self.precision.autocast():
                outputs = _call(module, batch, self.criterion is not None)
            if self.criterion is not None:
                targets = _targets(batch)
        if self.metric_inputs is not None:
            return self.metric_inputs(outputs, batch)
        if self.criterion is not None:
            return outputs, targets
        return default_metric_inputs(outputs, batch)

    def _compute_metrics(self, gathered: dict[str, list[tuple[Any, Any]]]) -> dict[str, Any]:
        results = {}
        for name, metric in self.metrics.items():
            if name in gathered:
                shards = collectives.all_gather_object(gathered[name], group=self.group)
                parts = [pair for rank_parts in shards for pair in rank_parts]
                metric.reset()
                if parts:
                    metric.update(torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts]))
                value = metric.compute()
            else:
                value = _compute_over(metric, self.group)
            results[f"val_{name}"] = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        return results


def sync_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), the ones a checkpoint stores.

    Each rank's buffers follow its own last forward (DDP broadcasts rank 0's at the start of a
    forward, then each rank updates them on its own batch), so without this every rank would
    evaluate a slightly different model. Every rank calls ``evaluate``, so the broadcasts match.
    """
    if collectives.world_size() == 1:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for buffer in module.buffers():
        groups.setdefault((buffer.dtype, buffer.device), []).append(buffer.data)
    for buffers in groups.values():  # one broadcast per dtype: BatchNorm's float stats, its int64 counts
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def _compute_over(metric: Any, group: Any) -> Any:
    """A torchmetrics Metric's ``compute()`` synced over ``group`` (None: its own group, every rank by default)."""
    if group is None:
        return metric.compute()
    own, metric.process_group = metric.process_group, group
    try:
        return metric.compute()
    finally:
        metric.process_group = own


def _syncs_itself(metric: Any) -> bool:
    """A torchmetrics Metric all-gathers its own states in compute()."""
    torchmetrics = sys.modules.get("torchmetrics")
    return torchmetrics is not None and isinstance(metric, torchmetrics.Metric)


def _call(module: torch.nn.Module, batch: Any, criterion: bool) -> Any:
    return call_on_inputs(module, split_batch(batch)[0]) if criterion else call_model(module, batch)


def _targets(batch: Any) -> Any:
    return split_batch(batch)[1]
