"""What the loss of a model that computes its own loss is a mean over, so accumulation weighs it exactly.

A Hugging Face model given ``labels`` returns the mean of its per-item losses over the labels that
are not ``-100``. Micro-batches (and ranks) hold different numbers of such items (padding, sequence
lengths, masking), so weighing each micro-batch by its samples does not give what one large batch
gives; weighing it by its items does (``accumulation.py``, items mode). Which items depends on what
the model is, read from its class and config, not from ``loss_type`` (which may be None for a model
built from a config):

- a causal LM (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, not an encoder-decoder): the labels after the
  shift it applies inside its loss, ``labels[..., 1:]`` (or ``shift_labels`` when the batch has them);
- a masked LM, a sequence-to-sequence LM (encoder-decoders shift the decoder's inputs, not the
  labels), a token classifier: ``labels`` as they are;
- a model whose loss is a mean over samples (sequence, image, audio classification, multiple
  choice, question answering): the samples, which is what accumulation weighs by anyway.

Anything else (a model of your own, a task not listed) is weighed by samples, and the Trainer says
so once: ``compute_loss`` returning ``(loss, num_items)`` makes it exact.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label torch's cross_entropy and transformers' losses leave out
SHIFTED = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",)
AS_GIVEN = ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
            "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES")
PER_SAMPLE = ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
              "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES",
              "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES")


class LabelItems:
    """Counts a batch's labels other than -100 (after the causal shift when ``shifted``), on the device."""

    def __init__(self, shifted: bool) -> None:
        self.shifted = shifted

    def __call__(self, batch: Any) -> torch.Tensor | None:
        """The count as a 0-dim tensor (no host sync), or None when the batch carries no labels."""
        if not isinstance(batch, Mapping):
            return None
        labels = batch.get("shift_labels") if self.shifted else None  # already shifted by the caller
        if labels is None:
            labels = batch.get("labels")
            if not isinstance(labels, torch.Tensor):
                return None
            if self.shifted:
                labels = labels[..., 1:]
        return (labels != IGNORE_INDEX).sum()

    def __repr__(self) -> str:
        return f"LabelItems(shifted={self.shifted})"


def what_the_loss_averages(module: nn.Module) -> str:
    """``"shifted"``, ``"labels"``, ``"samples"`` or ``"unknown"`` for a model that computes its own loss."""
    if not any(cls.__module__.startswith("transformers.") for cls in type(module).__mro__):
        return "unknown"
    mappings = sys.modules.get("transformers.models.auto.modeling_auto")
    if mappings is None:  # transformers is imported (the model is one of its classes); this part may not be
        import transformers.models.auto.modeling_auto as mappings
    names = {cls.__name__ for cls in type(module).__mro__}
    encoder_decoder = bool(getattr(getattr(module, "config", None), "is_encoder_decoder", False))

    def listed(tables: tuple[str, ...]) -> bool:
        return any(names & set(getattr(mappings, table, {}).values()) for table in tables)

    if listed(SHIFTED) and not encoder_decoder:
        return "shifted"
    if listed(AS_GIVEN) or listed(SHIFTED):
        return "labels"
    if listed(PER_SAMPLE):
        return "samples"
    return "unknown"


def label_items(module: nn.Module, windows_mix: bool) -> LabelItems | None:
    """The item counter for ``module``'s own loss, or None (weighed by samples). ``windows_mix``: more
    than one micro-batch per optimizer step over all ranks, where the weighing matters; then a model
    whose items anndist cannot count is reported once (rank 0)."""
    kind = what_the_loss_averages(module)
    if kind in ("shifted", "labels"):
        return LabelItems(shifted=kind == "shifted")
    if kind == "unknown" and windows_mix:
        logger.info(
            "%s computes its own loss and anndist cannot tell what that loss is a mean over, so accumulation "
            "weighs micro-batches and ranks by their samples; if the loss is a mean over tokens (or other items "
            "whose number varies between batches), pass compute_loss=lambda model, batch: (loss, num_items) to "
            "the Trainer to weigh every item alike (docs/training.md, 'The loss steps')", type(module).__name__)
    return None
