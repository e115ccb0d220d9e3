"""Models, data and one-process references shared by the tensor-parallel tests and the ranks they launch
(tests/support/scripts/tp_runs.py): what a (dp x tp) run must equal, computed in one process on the same global
batches."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from anndist import Trainer

PLAN = {"fc1": "colwise", "fc2": "rowwise"}
BLOCK_PLAN = {"blocks.*.fc1": "colwise", "blocks.*.fc2": "rowwise"}
FEATURES, HIDDEN, CLASSES = 8, 16, 4
MICRO = 8  # samples per global micro-batch (split over the data-parallel ranks)
GLOBAL_BATCH, GLOBAL_BATCH_PIECE = 16, 4  # Trainer(global_batch_size=16) on a loader of batch_size=4
QUIET = {"progress_bar": False, "handle_signals": False, "seed": 0, "stop_check_period": 0}


class MLP(nn.Module):
    """The held-out check's model: two Linear layers named fc1 and fc2 (optional dropout between)."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(FEATURES, HIDDEN), nn.Linear(HIDDEN, CLASSES), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class Block(nn.Module):
    # Forwards run by every Block, recomputations included (activation checkpointing runs two), counted
    # while ``counting``: off under torch.compile, where the count would break the graph (and hide the
    # checkpoint from the compiler, which is what the compiled tests are about).
    calls, counting = 0, False

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(HIDDEN, 2 * HIDDEN), nn.Linear(2 * HIDDEN, HIDDEN), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if Block.counting:
            Block.calls += 1
        return x + self.drop(self.fc2(torch.tanh(self.fc1(x))))


class Deep(nn.Module):
    """Blocks in a ModuleList (what activation_checkpointing=True checkpoints), dropout inside each."""

    def __init__(self, dropout: float = 0.2, blocks: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(FEATURES, HIDDEN)
        self.blocks = nn.ModuleList(Block(dropout) for _ in range(blocks))
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def model(kind: str = "mlp", seed: int = 0, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    return {"mlp": MLP, "deep": Deep}[kind](**kwargs)


def data(n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, FEATURES, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def trainer(module: nn.Module, optimizer: str = "adamw", **options: Any) -> Trainer:
    """The runs' Trainer (AdamW 1e-2 or SGD 0.1, cross-entropy unless ``compute_loss``), the same on the
    ranks and in the one-process comparisons."""
    opt = (torch.optim.AdamW(module.parameters(), lr=1e-2) if optimizer == "adamw"
           else torch.optim.SGD(module.parameters(), lr=0.1))
    criterion = None if options.get("compute_loss") else nn.CrossEntropyLoss()
    return Trainer(module, opt, criterion, **{**QUIET, **options})


def global_batch_loader() -> DataLoader:
    """The global-batch run's loader: ``data()`` shuffled in micro-batches of GLOBAL_BATCH_PIECE."""
    return DataLoader(TensorDataset(*data()), batch_size=GLOBAL_BATCH_PIECE, shuffle=True)


def global_batches(x: torch.Tensor, y: torch.Tensor, first: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global micro-batches ``first .. first+count-1`` of MICRO samples each."""
    return [(x[b * MICRO:(b + 1) * MICRO], y[b * MICRO:(b + 1) * MICRO]) for b in range(first, first + count)]


def rank_batches(batches: list, data_rank: int, data_world_size: int) -> list:
    """A per-rank loader as a user builds one: data-parallel rank d of D takes rows d, d+D, ... of each batch."""
    return [(x[data_rank::data_world_size], y[data_rank::data_world_size]) for x, y in batches]


def one_process(module: nn.Module, optimizer: torch.optim.Optimizer, batches: list, k: int,
                max_norm: float | None = None, losses: list | None = None) -> list[float]:
    """Train on ``batches`` (global micro-batches), K per step, mean cross-entropy; return the norms (and
    append each sample's loss to ``losses``)."""
    norms = []
    for start in range(0, len(batches), k):
        window = batches[start:start + k]
        total = sum(len(y) for _, y in window)
        for x, y in window:
            per_sample = nn.functional.cross_entropy(module(x), y, reduction="none")
            if losses is not None:
                losses.extend(per_sample.tolist())
            (per_sample.sum() / total).backward()
        if max_norm is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)))
        optimizer.step()
        optimizer.zero_grad()
    return norms


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def moved(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max_diff(a, b) if a.keys() == b.keys() else math.inf


def llama() -> nn.Module:
    """A 2-layer LlamaForCausalLM from a config (random weights, seeded), small enough for 4 CPU ranks."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def llama_ids(steps: int = 2, batch: int = 4, length: int = 8) -> list[torch.Tensor]:
    """Token ids of ``steps`` global batches (every sequence the same length: the mean over a rank's tokens
    weighs each token as the mean over the global batch does)."""
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 32, (batch, length), generator=g) for _ in range(steps)]


def gpt2() -> nn.Module:
    """launch/train_gpt2.py's GPT-2 shape without dropout (so that a split run can equal one process)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=24, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def gpt2_batches(count: int = 4, batch: int = 4, length: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(count):
        ids = torch.randint(1, 24, (batch, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out
