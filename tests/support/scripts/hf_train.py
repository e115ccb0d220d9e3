"""Entry point of tests/e2e/test_hf_models.py: Hugging Face models through the Trainer, resumed bit for bit.

    torchrun --standalone --nproc_per_node=2 tests/support/scripts/hf_train.py --out DIR

One launch (transformers takes seconds to import) trains two jobs, each three times with a fresh
model and Trainer: ``full`` (EPOCHS epochs), ``stopped`` (stopped mid-epoch at a fixed step, then
``save_in_dir``) and ``resumed`` (``fit(resume_from="latest")`` of that checkpoint, to the end).

- ``gpt2``: the 2-layer GPT-2 of launch/train_gpt2.py on variable-length character windows, padded
  with labels -100, token-weighted through ``compute_loss`` (``(loss, num_tokens)``), K=2.
- ``bert``: a 2-layer BERT classifier with no criterion (the model's own loss from ``labels``), K=2,
  and torchmetrics' macro F1 (``val_f1``).

The full runs also record what the test checks the evaluation against: ``predict`` on the BERT
validation set (with its labels), and each GPT-2 validation sequence's loss computed alone. Last,
launch/train_gpt2.py's ``main`` runs with ``--max-steps 5 --checkpoint-dir DIR/example-ckpt``.

Every rank writes ``DIR/rank{r}.pt``: per job and run the flat final weights, the history, the
position where it began and ended; then ``finished: True`` once every Trainer is closed.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassF1Score
from transformers import BertConfig, BertForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "launch"))
import train_gpt2  # noqa: E402
from train_gpt2 import CharVocab, gpt2_model, lm_datasets, pad_batch, token_loss, zen_text  # noqa: E402

from anndist import Callback, Trainer, seed_everything  # noqa: E402

SEED, EPOCHS, ACCUMULATION = 11, 3, 2
STOP_AT = {"gpt2": 9, "bert": 8}  # the stop is set after this step; 2 ranks agree on it one step later
CLASSES = 3


# ----------------------------------------------------------------------------- the BERT job's data
def char_class(char: str) -> int:
    """0: lowercase letter, 1: uppercase letter, 2: anything else."""
    return 0 if char.islower() else 1 if char.isupper() else 2


class FirstCharClass(Dataset):
    """Windows of the text labelled with the class of their first character, classes balanced."""

    def __init__(self, count: int, seed: int, vocab: CharVocab) -> None:
        text, rng = zen_text(), random.Random(seed)
        starts = {c: [i for i, ch in enumerate(text[:-32]) if char_class(ch) == c] for c in range(CLASSES)}
        self.items = []
        for i in range(count):
            label = i % CLASSES
            start = rng.choice(starts[label])
            self.items.append((vocab.encode(text[start:start + rng.randint(8, 32)]), label))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.items[index]


def classification_batch(samples: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    batch = pad_batch([ids for ids, _ in samples])
    batch["labels"] = torch.tensor([label for _, label in samples])
    return batch


# ----------------------------------------------------------------------------- the two jobs
Job = Callable[[], tuple[torch.nn.Module, dict[str, Any], DataLoader, DataLoader]]


def gpt2_job() -> tuple[torch.nn.Module, dict[str, Any], DataLoader, DataLoader]:
    """104 windows: 13 micro-batches of 4 per rank and epoch, so each epoch ends on a short window."""
    vocab, train_set, val_set = lm_datasets(train_count=104, val_count=24, seed=SEED)
    model = gpt2_model(len(vocab), seed=SEED)
    return (model, {"compute_loss": token_loss},
            DataLoader(train_set, batch_size=4, shuffle=True, collate_fn=pad_batch),
            DataLoader(val_set, batch_size=8, collate_fn=pad_batch))


def bert_job() -> tuple[torch.nn.Module, dict[str, Any], DataLoader, DataLoader]:
    """126 windows: 11 micro-batches per rank and epoch, the last of 3 samples (a short window)."""
    vocab = CharVocab(zen_text())
    seed_everything(SEED)
    config = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=len(vocab), max_position_embeddings=64, num_labels=CLASSES, pad_token_id=0)
    model = BertForSequenceClassification(config)
    return (model, {"metrics": {"f1": MulticlassF1Score(CLASSES)}},
            DataLoader(FirstCharClass(126, SEED, vocab), batch_size=6, shuffle=True, collate_fn=classification_batch),
            DataLoader(FirstCharClass(45, SEED + 1, vocab), batch_size=8, collate_fn=classification_batch))


JOBS: dict[str, Job] = {"gpt2": gpt2_job, "bert": bert_job}


# ----------------------------------------------------------------------------- the runs
class Probe(Callback):
    """Notes where fit began (after any resume) and asks for a stop after step ``stop_at``."""

    def __init__(self, stop_at: int | None) -> None:
        self.stop_at, self.begin = stop_at, None

    def on_train_begin(self, trainer, logs=None):
        self.begin = {"epoch": trainer.epoch, "global_step": trainer.global_step,
                      "batch_in_epoch": trainer.batch_in_epoch}

    def on_batch_end(self, batch_idx, trainer, logs=None):
        if logs["ends_window"] and trainer.global_step == self.stop_at:
            trainer.stop_training = True


def run(job: str, kind: str, checkpoint_dir: Path) -> tuple[Trainer, dict[str, Any]]:
    """One run of ``job``: ``full``, ``stopped`` (then saved) or ``resumed`` (from the saved one)."""
    model, options, train_loader, val_loader = JOBS[job]()
    probe = Probe(STOP_AT[job] if kind == "stopped" else None)
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=3e-3), callbacks=[probe], seed=SEED,
                      gradient_accumulation_steps=ACCUMULATION, stop_check_period=0, checkpoint_dir=checkpoint_dir,
                      progress_bar=False, **options)
    history = trainer.fit(train_loader, EPOCHS, val_loader=val_loader,
                          resume_from="latest" if kind == "resumed" else None)
    if kind == "stopped":
        trainer.save_in_dir(checkpoint_dir)
    result = {"params": torch.cat([p.detach().reshape(-1).cpu() for p in trainer.module.parameters()]),
              "history": history, "begin": probe.begin,
              "end": {"epoch": trainer.epoch, "global_step": trainer.global_step,
                      "batch_in_epoch": trainer.batch_in_epoch}}
    if job == "bert" and kind == "full":
        result["predictions"] = trainer.predict(val_loader)
        result["val_labels"] = torch.tensor([label for _, label in val_loader.dataset])
    if job == "gpt2" and kind == "full":
        result["val_sequences"] = sequence_losses(trainer.module, val_loader.dataset)
    return trainer, result


@torch.no_grad()
def sequence_losses(module: torch.nn.Module, dataset: Dataset) -> list[tuple[float, int]]:
    """(summed token loss, tokens) of each validation sequence alone, in this process, without padding."""
    module.eval()
    out = []
    for ids in dataset:
        loss, tokens = token_loss(module, pad_batch([ids]))
        out.append((float(loss) * int(tokens), int(tokens)))
    module.train()
    return out


@record
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="folder: checkpoints, and rank{r}.pt from each rank")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out, results, trainers = Path(args.out), {"rank": int(os.environ.get("RANK", 0))}, []
    for job in JOBS:
        for kind in ("full", "stopped", "resumed"):
            trainer, results[f"{job}/{kind}"] = run(job, kind, out / f"{job}-ckpt")
            trainers.append(trainer)
    # The example's main() in this same launch (a torchrun start costs seconds): --max-steps on 2 ranks.
    results["example"] = train_gpt2.main(["--max-steps", "5", "--accumulation", "3", "--epochs", "3",
                                          "--checkpoint-dir", str(out / "example-ckpt")])
    results["world_size"] = trainers[0].world_size
    for trainer in reversed(trainers):  # the first one created the process group: it goes last
        trainer.close()
    results["finished"] = True
    torch.save(results, out / f"rank{results['rank']}.pt")


if __name__ == "__main__":
    main()
