"""Train a 2-layer GPT-2 character model on the Zen of Python (shipped with Python: no download).

The model computes its own loss from the batch's ``labels`` (no criterion, no ``compute_loss``), and
the Trainer weighs it by tokens: it knows a causal LM's loss is a mean over the labels other than
-100 after the shift, so with accumulation every token of an optimizer step weighs the same, however
the variable-length sequences fall into micro-batches and ranks. ``token_loss`` below is the same
weighing written by hand, as ``compute_loss`` for a model anndist cannot see into. At the end rank 0
prints the validation perplexity (exp of the token-weighted validation loss) on the held-out last
lines of the text.

    python launch/train_gpt2.py --epochs 2
    bash launch/torchrun.sh --script launch/train_gpt2.py --epochs 20 --accumulation 2
    torchrun --standalone --nproc_per_node=2 launch/train_gpt2.py --max-steps 30 --checkpoint-dir runs/gpt2
    torchrun --standalone --nproc_per_node=4 launch/train_gpt2.py --tp 2 --strategy fsdp --max-steps 30

``--tp 2`` splits each block's attention and MLP layers over pairs of ranks (tensor parallelism, the
plan in ``gpt2_tp_plan``), and the strategy acts across the pairs: replicas by default, FSDP shards
with ``--strategy fsdp`` (2-D). ``--activation-checkpointing`` recomputes each block in the backward.

With ``--checkpoint-dir`` a run resumes from the folder's latest checkpoint (a later run with more
epochs or steps continues where this one ended) and saves its final state there.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import math
import random

import torch
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset
from anndist import Callback, Conv1DColwise, Conv1DRowwise, LoggingCallback, Trainer, seed_everything
from anndist.optional import require
from example_support import report_missing_dependency

PAD, IGNORE = 0, -100  # padding token id; the label of padded positions (ignored by the loss)
MAX_LEN = 64           # the model's n_positions


def zen_text() -> str:
    """The Zen of Python: ``this.s`` is stored rot13-encoded; importing ``this`` prints it, so hush it."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


class CharVocab:
    """Characters of a text as token ids 1..N; id 0 is padding."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.ids = {char: i + 1 for i, char in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.ids[char] for char in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.chars[i - 1] for i in ids.tolist() if i != PAD)


def windows(text: str, count: int, min_len: int, max_len: int, seed: int) -> list[str]:
    """``count`` substrings of random lengths in [min_len, max_len] at random offsets (own RNG: reproducible)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = rng.randint(min_len, max_len)
        start = rng.randrange(len(text) - length + 1)
        out.append(text[start:start + length])
    return out


class TokenSequences(Dataset):
    """Variable-length token id tensors."""

    def __init__(self, texts: list[str], vocab: CharVocab) -> None:
        self.items = [vocab.encode(t) for t in texts]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.items[index]


def pad_batch(sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: ``input_ids``, ``attention_mask``, and ``labels`` with -100 on padding."""
    lengths = torch.tensor([len(s) for s in sequences])
    input_ids = pad_sequence(sequences, batch_first=True, padding_value=PAD)
    attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, IGNORE)}


def lm_datasets(train_count: int = 256, val_count: int = 64, min_len: int = 12, max_len: int = 48,
                seed: int = 0) -> tuple[CharVocab, TokenSequences, TokenSequences]:
    """The vocabulary, training windows of the text and validation windows of its last 3 lines (held out)."""
    text = zen_text()
    lines = text.strip().splitlines()
    train_text, val_text = "\n".join(lines[:-3]), "\n".join(lines[-3:])
    vocab = CharVocab(text)
    return (vocab, TokenSequences(windows(train_text, train_count, min_len, max_len, seed), vocab),
            TokenSequences(windows(val_text, val_count, min_len, max_len, seed + 1), vocab))


def gpt2_model(vocab_size: int, seed: int | None = None) -> torch.nn.Module:
    """A 2-layer, 32-wide GPT-2 built from its config (random weights; ``seed`` makes them reproducible)."""
    transformers = require("transformers", "launch/train_gpt2.py")  # one line when it is missing
    if seed is not None:
        seed_everything(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=MAX_LEN, vocab_size=vocab_size,
                                     bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD)
    return transformers.GPT2LMHeadModel(config)


def gpt2_tp_plan() -> dict:
    """Tensor parallelism for GPT-2's blocks, whose layers are transformers' ``Conv1D`` (weights stored
    inputs x outputs): the MLP's first layer split by output features and its second by input features
    (one all-reduce); the attention's fused q|k|v layer split by output features and gathered, so every
    rank runs the attention itself on whole q, k, v, and its output layer split by input features.

    Splitting the attention by heads would need each rank's slice of q, of k and of v, three separate
    column blocks of the fused weight, which a checkpoint cannot store as one shard per rank; gathering
    q, k, v keeps every parameter split in plain blocks (so checkpoints reshard onto any layout) at the
    cost of one all-gather per block and the attention's own arithmetic done on every rank.
    """
    from torch.distributed.tensor import Replicate
    return {"transformer.h.*.attn.c_attn": Conv1DColwise(output_layouts=Replicate()),
            "transformer.h.*.attn.c_proj": Conv1DRowwise(input_layouts=Replicate()),
            "transformer.h.*.mlp.c_fc": Conv1DColwise(),
            "transformer.h.*.mlp.c_proj": Conv1DRowwise()}


def token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy as ``compute_loss``: (mean over the batch's predicted tokens, their number).

    What the Trainer does by itself for this model, written out: the labels stay out of the model call,
    the logits of token t are scored against token t+1.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                reduction="none")
    num_tokens = (targets != IGNORE).sum()
    return per_token.sum() / num_tokens.clamp(min=1), num_tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per process and micro-batch")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"],
                        help="replicas (ddp) or shards (fsdp) across the ranks (across the tensor-parallel groups)")
    parser.add_argument("--tp", type=int, default=1, help="ranks that split each block's layers (tensor parallel)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each block's activations in the backward pass")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="resume from this folder's latest checkpoint and save the final state there")
    args = parser.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be >= 1")
    return args


@record
@report_missing_dependency
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    vocab, train_set, val_set = lm_datasets()
    model = gpt2_model(len(vocab), seed=args.seed)  # identical initial weights on every rank
    callbacks: list[Callback] = [LoggingCallback(log_interval=args.log_interval)]
    trainer = Trainer(
        model, torch.optim.AdamW(model.parameters(), lr=args.lr), callbacks=callbacks,  # the model's loss, by tokens
        seed=args.seed, gradient_accumulation_steps=args.accumulation,
        checkpoint_dir=args.checkpoint_dir, auto_resume=args.checkpoint_dir is not None,
        strategy=args.strategy, tp_size=args.tp, tp_plan=gpt2_tp_plan() if args.tp > 1 else None,
        activation_checkpointing=args.activation_checkpointing,
    )
    val_loader = DataLoader(val_set, batch_size=32, collate_fn=pad_batch)
    history = trainer.fit(DataLoader(train_set, batch_size=args.batch_size, shuffle=True, collate_fn=pad_batch),
                          num_epochs=args.epochs, max_steps=args.max_steps, val_loader=val_loader)
    if args.checkpoint_dir is not None:
        trainer.save_in_dir(args.checkpoint_dir)
    val_loss = trainer.evaluate(val_loader)["val_loss"]  # also after a stop mid-epoch, which skips evaluation
    if trainer.is_main_process:
        print(f"validation perplexity {math.exp(val_loss):.3f} (val_loss {val_loss:.4f}) after "
              f"{trainer.global_step} optimizer steps on {trainer.world_size} process(es)"
              f"{f' ({trainer.strategy.grid.describe()})' if args.tp > 1 else ''}", flush=True)
    trainer.close()
    return {"history": history, "val_loss": val_loss, "global_step": trainer.global_step}


if __name__ == "__main__":
    main()
