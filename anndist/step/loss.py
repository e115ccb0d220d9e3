"""How a batch becomes a loss (and outputs), for every kind of job. Chosen once, when the Trainer is built:

- **criterion**: the batch is ``(inputs, targets)`` or ``{"inputs": ..., "targets": ...}``; the loss is
  ``criterion(model(inputs), targets)`` (a mapping ``inputs`` is passed as keywords).
- **no criterion**: the model computes its own loss. A mapping batch is passed as keywords
  (``model(**batch)``, as Hugging Face models expect), a tuple/list as positional arguments, anything
  else as one argument; the loss is the output's ``.loss``, its ``"loss"`` key, or the output itself
  when it is a scalar tensor.
- **compute_loss(model, batch)**: the user's function (or a ``Trainer`` subclass's method) returns a
  scalar loss, or ``(loss, num_items)`` where the loss is a mean over ``num_items`` items (tokens,
  pixels, samples): accumulation then weighs every item equally (see ``accumulation.py``).

Batches arrive here already on the device.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch

from ..data.batch import batch_size, first_tensor, prepare_batch, split_batch, to_device
from .label_items import label_items

LossResult = tuple[torch.Tensor, "torch.Tensor | int | None"]  # (scalar loss, num_items or None)


def call_model(model: Any, batch: Any) -> Any:
    """The model on a whole batch: a mapping as keywords, a tuple/list as positional arguments."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def call_on_inputs(model: Any, inputs: Any) -> Any:
    """The model on a criterion batch's ``inputs``: today's contract, a mapping as keywords."""
    if type(inputs) is torch.Tensor:  # the common case, without an ABC isinstance per micro-batch
        return model(inputs)
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def loss_of(output: Any) -> torch.Tensor:
    """The loss a model returned: ``.loss`` (transformers' ModelOutput), a ``"loss"`` key, or a scalar output."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None and isinstance(output, torch.Tensor) and output.dim() == 0:
        loss = output
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        raise TypeError(
            f"the Trainer has no criterion, so the model must compute its loss, but it returned {_describe(output)}; "
            "return a scalar tensor, an object with a .loss (as transformers' models do when given labels) or a "
            "dict with a 'loss' key, or pass criterion=... or compute_loss=... to the Trainer")
    return loss


def model_output(model: Any, batch: Any) -> Any:
    """The output of a model that computes its own loss (no criterion), called on the whole batch."""
    try:
        return call_model(model, batch)
    except TypeError as exc:
        how = ("model(**batch)" if isinstance(batch, Mapping) else
               "model(*batch)" if isinstance(batch, (tuple, list)) else "model(batch)")
        raise TypeError(f"the Trainer has no criterion, so it calls {how} for the model to compute its own loss, "
                        f"and that failed: {exc}; for (inputs, targets) batches pass criterion=..., or pass "
                        "compute_loss=...") from exc


def model_loss(model: Any, batch: Any) -> torch.Tensor:
    """The loss of a model that computes its own loss (no criterion)."""
    return loss_of(model_output(model, batch))


class ModelLoss:
    """The loss step of a model that computes its own loss: ``(loss, items)`` when ``count`` can tell what
    the loss is a mean over (``label_items.py``: the labels of a Hugging Face LM), else the loss alone."""

    def __init__(self, count: Callable[[Any], Any] | None) -> None:
        self.count = count

    def __call__(self, model: Any, batch: Any) -> Any:
        loss = model_loss(model, batch)
        if self.count is None:
            return loss
        items = self.count(batch)
        return loss if items is None else (loss, items)


def predictions_of(output: Any) -> Any:
    """What predict() keeps of an output: ``logits`` when there are some, else the output itself."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    return output if logits is None else logits


def check_result(result: Any) -> LossResult:
    """``compute_loss``'s return value as ``(loss, num_items or None)``, or a TypeError saying what is wrong."""
    loss, num_items = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        raise TypeError(f"compute_loss must return a scalar loss tensor or (loss, num_items), got {_describe(result)}; "
                        "reduce the loss to one number, e.g. per_item.sum() / num_items")
    if num_items is not None and not (isinstance(num_items, int) and not isinstance(num_items, bool)
                                      or isinstance(num_items, torch.Tensor) and num_items.numel() == 1):
        raise TypeError(f"compute_loss returned num_items={num_items!r}; it must be an int or a one-element tensor "
                        "(the number of items the loss is a mean over)")
    return loss, num_items


def sample_count(batch: Any, criterion: bool) -> int:
    """Samples in a batch on the device: the first dimension of the targets, else of the first tensor."""
    if criterion:
        inputs, targets = split_batch(batch)
        return batch_size(inputs, targets)
    tensor = first_tensor(batch)
    if tensor is None or tensor.dim() == 0:
        raise TypeError("cannot tell the batch size: the batch holds no tensor with a batch dimension")
    return tensor.shape[0]


def default_metric_inputs(output: Any, batch: Any) -> tuple[Any, Any]:
    """For models without a criterion: the output's ``logits`` and the batch's ``labels``."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if labels is None:
        raise TypeError("metrics need targets: the batch has no 'labels' key; pass metric_inputs=lambda output, "
                        "batch: (predictions, targets) to the Trainer")
    return predictions_of(output), labels


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {sorted(map(str, value))[:8]}"
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}: ({', '.join(_describe(v) for v in value[:3])})"
    return f"a {type(value).__name__}"


MetricInputs = Callable[[Any, Any], tuple[Any, Any]]


class LossStep:
    """One training micro-batch's ``(loss, samples, num_items or None)``, the batch moved to the device here.

    ``compute_loss`` None is the criterion path, kept as the short path it always was: split, move,
    ``criterion(model(inputs), targets)``; otherwise ``compute_loss(model, batch)`` (``model_loss`` for a
    model that computes its own loss).
    """

    def __init__(self, criterion: Callable | None, compute_loss: Callable | None, device: torch.device) -> None:
        self.criterion, self.compute_loss, self.device = criterion, compute_loss, device
        self.non_blocking = device.type == "cuda"

    def __call__(self, model: Any, batch: Any) -> tuple[torch.Tensor, int, Any]:
        if self.compute_loss is None:
            inputs, targets, n = prepare_batch(batch, self.device, self.non_blocking)
            output = model(inputs) if type(inputs) is torch.Tensor else call_on_inputs(model, inputs)
            return self.criterion(output, targets), n, None
        batch = to_device(batch, self.device, self.non_blocking)
        loss, num_items = check_result(self.compute_loss(model, batch))
        return loss, sample_count(batch, self.criterion is not None), num_items


def choose_loss_step(compute_loss: Callable | None, criterion: Callable | None, module: Any,
                     mixes: bool) -> Callable | None:
    """The loss step, chosen once: the user's ``compute_loss`` (an option or a Trainer subclass's method),
    else None for the criterion's short path, else the model's own loss with the items it averages over
    counted where the model says what they are (``label_items.py``; ``mixes``: accumulation or several
    data-parallel ranks mix micro-batches, so the count matters)."""
    if compute_loss is not None:
        return compute_loss
    if criterion is not None:
        return None
    return ModelLoss(label_items(module, mixes))
