"""Tiny Hugging Face models (built from configs: no download) and token-weighted references written by hand.

Three kinds of model that compute their own loss from ``labels``, each on variable-length sequences
padded per micro-batch (padding labelled -100):

- ``gpt2``: GPT2LMHeadModel, a causal LM (its loss shifts the labels by one inside the model);
- ``bert``: BertForMaskedLM, a masked LM (labels only at the masked positions);
- ``t5``: T5ForConditionalGeneration, an encoder-decoder (targets of their own lengths).

``reference_run`` trains the same initial model the way one large batch does, written out by hand:
for each optimizer step, the sum of every per-token loss of the step's global window (all micro-
batches of all ranks), each sequence run alone without padding, divided by the number of those
tokens. ``window_layout`` says which samples a step holds: anndist's sampler with ``shuffle=False``
gives rank r the indices r, r+W, r+2W, ... in batches of B, and a step takes K of them on each rank.
"""
from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

VOCAB, PAD, IGNORE = 40, 0, -100
MASK = VOCAB - 1  # BERT's [MASK] id in these sequences
JOBS = ("gpt2", "bert", "t5")


def build_model(job: str, seed: int = 0) -> nn.Module:
    """2 layers, hidden 32, no dropout (the references must see the same function), float32."""
    import transformers as tf

    torch.manual_seed(seed)
    if job == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=1,
                               eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = tf.GPT2LMHeadModel(config)
    elif job == "bert":
        config = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=32, pad_token_id=PAD,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = tf.BertForMaskedLM(config)
    elif job == "t5":
        config = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                             dropout_rate=0.0, pad_token_id=PAD, decoder_start_token_id=PAD, eos_token_id=1)
        model = tf.T5ForConditionalGeneration(config)
    else:
        raise ValueError(job)
    return model


class Sequences(Dataset):
    """``n`` samples of random tokens with lengths from 3 to 14 (targets 2 to 9 for t5)."""

    def __init__(self, job: str, n: int, seed: int) -> None:
        rng = random.Random(seed)
        self.job, self.items = job, []
        for _ in range(n):
            ids = torch.tensor([rng.randrange(2, MASK) for _ in range(rng.randint(3, 14))])
            if job == "gpt2":
                self.items.append({"input_ids": ids, "labels": ids.clone()})
            elif job == "bert":
                masked = torch.tensor([rng.random() < 0.3 for _ in ids])
                masked[rng.randrange(len(ids))] = True  # at least one label per sequence
                self.items.append({"input_ids": torch.where(masked, MASK, ids),
                                   "labels": torch.where(masked, ids, IGNORE)})
            else:
                target = torch.tensor([rng.randrange(2, MASK) for _ in range(rng.randint(2, 9))])
                self.items.append({"input_ids": ids, "labels": target})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def pad_batch(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad to the micro-batch's longest: inputs with PAD (attention mask 0), labels with -100."""
    def pad(key: str, value: int) -> torch.Tensor:
        longest = max(len(s[key]) for s in samples)
        return torch.stack([F.pad(s[key], (0, longest - len(s[key])), value=value) for s in samples])

    ids = pad("input_ids", PAD)
    return {"input_ids": ids, "attention_mask": (pad("input_ids", -1) != -1).long(), "labels": pad("labels", IGNORE)}


def token_losses(model: nn.Module, job: str, sample: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every per-token loss of one sequence, alone (no padding), from the logits, by hand."""
    ids, labels = sample["input_ids"][None], sample["labels"]
    if job == "gpt2":  # token t predicts token t+1
        logits = model(input_ids=ids).logits[0]
        return F.cross_entropy(logits[:-1], labels[1:], reduction="none")
    if job == "bert":
        logits = model(input_ids=ids).logits[0]
        keep = labels != IGNORE
        return F.cross_entropy(logits[keep], labels[keep], reduction="none")
    decoder_inputs = torch.cat([torch.tensor([PAD]), labels[:-1]])[None]  # the start token, then the targets
    logits = model(input_ids=ids, decoder_input_ids=decoder_inputs).logits[0]
    return F.cross_entropy(logits, labels, reduction="none")


def window_layout(n: int, world_size: int, batch_size: int, k: int) -> list[list[int]]:
    """The dataset indices of each optimizer step's global window (``shuffle=False``, n divisible by W)."""
    assert n % world_size == 0
    per_rank = [list(range(r, n, world_size)) for r in range(world_size)]
    batches = [[idx[i:i + batch_size] for i in range(0, len(idx), batch_size)] for idx in per_rank]
    steps = (len(batches[0]) + k - 1) // k
    return [[i for rank in batches for batch in rank[s * k:(s + 1) * k] for i in batch] for s in range(steps)]


def reference_run(job: str, dataset: Dataset, world_size: int, batch_size: int, k: int, lr: float,
                  epochs: int) -> dict[str, Any]:
    """One large batch per optimizer step, token-weighted by hand: final flat weights and each epoch's
    train loss (every token of the epoch once, at the weights it was trained with)."""
    model = build_model(job)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    train_loss = []
    for _ in range(epochs):
        epoch_sum, epoch_tokens = 0.0, 0
        for window in window_layout(len(dataset), world_size, batch_size, k):
            losses = torch.cat([token_losses(model, job, dataset[i]) for i in window])
            loss = losses.sum() / losses.numel()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_sum, epoch_tokens = epoch_sum + losses.sum().item(), epoch_tokens + losses.numel()
        train_loss.append(epoch_sum / epoch_tokens)
    return {"params": flat(model), "train_loss": train_loss}


@torch.no_grad()
def reference_loss(model: nn.Module, job: str, dataset: Dataset) -> float:
    """Every token of the dataset once: sum of per-token losses / their number."""
    model.eval()
    losses = torch.cat([token_losses(model, job, dataset[i]) for i in range(len(dataset))])
    return losses.sum().item() / losses.numel()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])


def load_flat(model: nn.Module, params: torch.Tensor) -> nn.Module:
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(params[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    return model
