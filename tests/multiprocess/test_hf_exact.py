"""Hugging Face models that compute their own loss are token-exact by default: no criterion, no
compute_loss, and accumulation over micro-batches and ranks gives what one large batch gives.

A causal LM (GPT-2), a masked LM (BERT) and an encoder-decoder (T5), tiny and built from configs,
train on variable-length sequences padded per micro-batch (``hf_tiny.py``), K=1 and K=4 (the last
window short), on 1 process and on 2 ranks; the final weights and each epoch's ``train_loss`` are
compared with a reference written by hand (per-token losses of each step's global window, summed,
divided by their number), and ``evaluate`` with every validation token weighed once. The same jobs
with the model's loss weighed by samples (``compute_loss`` returning the loss alone: what anndist did
before, and what a per-micro-batch mean gives) land far from the reference, so the comparison has teeth.

One spawn of 2 ranks runs every 2-rank job (transformers takes seconds to import).
"""
from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

if importlib.util.find_spec("transformers") is None:
    pytest.skip("the Hugging Face tests need transformers (pip install '.[hf]')", allow_module_level=True)

from anndist import Trainer  # noqa: E402
from support.hf_tiny import (JOBS, Sequences, build_model, flat, load_flat, pad_batch, reference_loss,  # noqa: E402
                     reference_run)
from support.run_once import once  # noqa: E402
from support import run_spawn  # noqa: E402

B, N, N_VAL, LR, EPOCHS = 2, 38, 15, 0.3, 2  # 19 sequences per rank: K=4 windows of 4, 4 and a short 2 batches
KS = (1, 4)
TOLERANCE = 1e-5


def train_set(job: str) -> Sequences:
    return Sequences(job, N, seed=1)


def val_set(job: str) -> Sequences:
    return Sequences(job, N_VAL, seed=2)


def run_job(job: str, k: int, by_samples: bool = False) -> dict:
    """One Trainer run: its final weights, history and a final ``evaluate``."""
    model = build_model(job)
    options = {"compute_loss": lambda m, batch: m(**batch).loss} if by_samples else {}
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=LR), gradient_accumulation_steps=k,
                      progress_bar=False, log_epochs=False, **options)
    history = trainer.fit(DataLoader(train_set(job), batch_size=B, collate_fn=pad_batch), num_epochs=EPOCHS)
    val = trainer.evaluate(DataLoader(val_set(job), batch_size=4, collate_fn=pad_batch))
    trainer.close()
    return {"params": flat(model), "train_loss": history["train_loss"], "val_loss": val["val_loss"]}


def all_jobs(rank: int = 0, world_size: int = 1) -> dict:
    torch.set_num_threads(1)
    results = {(job, k): run_job(job, k) for job in JOBS for k in KS}
    results.update({(job, "by_samples"): run_job(job, 4, by_samples=True) for job in JOBS})
    return results


def _all_runs(folder) -> dict[int, dict]:
    ranks = run_spawn(all_jobs, 2, timeout=280)
    for key, result in ranks[0].items():
        assert torch.equal(result["params"], ranks[1][key]["params"]), key
        assert result["val_loss"] == ranks[1][key]["val_loss"], key
    return {2: ranks[0], 1: all_jobs()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, dict]:
    """world size -> results: rank 0's of the 2-rank spawn (the ranks' weights are checked equal), and
    one process's; once per session (run_once.py)."""
    return once(tmp_path_factory, "hf_exact_runs", _all_runs)


@pytest.fixture(scope="module")
def references() -> dict:
    return {(job, w, k): reference_run(job, train_set(job), w, B, k, LR, EPOCHS)
            for job in JOBS for w in (1, 2) for k in KS}


@pytest.mark.parametrize("world_size", (1, 2))
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("job", JOBS)
def test_no_criterion_is_token_weighted_like_one_large_batch(runs, references, job, k, world_size):
    result, reference = runs[world_size][(job, k)], references[(job, world_size, k)]
    assert (result["params"] - reference["params"]).abs().max().item() < TOLERANCE
    assert result["train_loss"] == pytest.approx(reference["train_loss"], rel=TOLERANCE)


@pytest.mark.parametrize("world_size", (1, 2))
@pytest.mark.parametrize("job", JOBS)
def test_weighing_the_models_loss_by_samples_lands_far_from_the_reference(runs, references, job, world_size):
    """The control: the same K=4 job with the loss weighed by samples differs in weights and train_loss."""
    result, reference = runs[world_size][(job, "by_samples")], references[(job, world_size, 4)]
    assert (result["params"] - reference["params"]).abs().max().item() > 100 * TOLERANCE  # measured 1e-2 to 1e-1
    off = [abs(got - want) / want for got, want in zip(result["train_loss"], reference["train_loss"])]
    assert max(off) > 20 * TOLERANCE  # measured 6.6e-4 to 4.8e-3


@pytest.mark.parametrize("world_size", (1, 2))
@pytest.mark.parametrize("job", JOBS)
def test_val_loss_weighs_every_validation_token_once(runs, job, world_size):
    result = runs[world_size][(job, 4)]
    model = load_flat(build_model(job), result["params"])
    by_tokens = reference_loss(model, job, val_set(job))
    assert result["val_loss"] == pytest.approx(by_tokens, rel=TOLERANCE)
    with torch.no_grad():  # the control: each batch's mean loss weighed by its samples, as before
        batches = [pad_batch([val_set(job)[i] for i in range(s, min(s + 4, N_VAL))]) for s in range(0, N_VAL, 4)]
        by_samples = sum(model(**b).loss.item() * len(b["labels"]) for b in batches) / N_VAL
    assert abs(by_samples - by_tokens) > 5 * TOLERANCE * by_tokens


# ------------------------------------------------------------------ which models anndist can count for
def _tiny(name: str, **config):
    import transformers as tf

    small = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if name == "bart":
        return tf.BartForCausalLM(tf.BartConfig(vocab_size=40, d_model=32, encoder_layers=1, decoder_layers=1,
                                                encoder_attention_heads=2, decoder_attention_heads=2,
                                                encoder_ffn_dim=32, decoder_ffn_dim=32))
    return getattr(tf, name)(tf.BertConfig(**small, **config))


def test_what_the_loss_averages_is_read_from_the_model_class():
    from anndist.step.label_items import what_the_loss_averages
    import transformers as tf

    class MyLM(tf.GPT2LMHeadModel):  # a subclass of a causal LM shifts like it
        pass

    class Own(nn.Module):
        def forward(self, x):
            return x.sum()

    assert what_the_loss_averages(build_model("gpt2")) == "shifted"
    assert what_the_loss_averages(MyLM(build_model("gpt2").config)) == "shifted"
    assert what_the_loss_averages(_tiny("bart")) == "shifted"  # BartForCausalLM: decoder-only, is_encoder_decoder off
    assert what_the_loss_averages(build_model("bert")) == "labels"
    assert what_the_loss_averages(build_model("t5")) == "labels"  # encoder-decoder: labels are not shifted
    assert what_the_loss_averages(_tiny("BertForTokenClassification")) == "labels"
    assert what_the_loss_averages(_tiny("BertForSequenceClassification")) == "samples"
    assert what_the_loss_averages(_tiny("BertModel")) == "unknown"
    assert what_the_loss_averages(Own()) == "unknown"


def test_the_count_is_the_labels_other_than_minus_100_after_the_shift():
    from anndist.step.label_items import LabelItems

    labels = torch.tensor([[5, 6, 7, -100], [8, -100, -100, -100]])
    assert int(LabelItems(shifted=True)({"labels": labels})) == 2  # 6, 7 (the first token predicts nothing)
    assert int(LabelItems(shifted=False)({"labels": labels})) == 4
    assert int(LabelItems(shifted=True)({"labels": labels, "shift_labels": labels})) == 4  # already shifted
    assert LabelItems(shifted=True)({"input_ids": labels}) is None


class _Info(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class OwnLoss(nn.Module):
    """A model that computes its own loss, which anndist cannot see into."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x, labels):
        return (self.linear(x).squeeze(1) - labels).pow(2).mean()


@pytest.mark.parametrize("k, says", ((1, False), (2, True)))
def test_a_model_anndist_cannot_count_for_is_reported_once(k, says):
    handler = _Info()
    logger = logging.getLogger("anndist")
    logger.addHandler(handler)
    try:
        model = OwnLoss()
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), gradient_accumulation_steps=k,
                          progress_bar=False, log_epochs=False)
        data = [{"x": torch.randn(4, 3), "labels": torch.randn(4)} for _ in range(4)]
        trainer.fit(data, num_epochs=2)
        gpt2 = build_model("gpt2")
        Trainer(gpt2, torch.optim.SGD(gpt2.parameters(), lr=0.1), gradient_accumulation_steps=2, progress_bar=False,
                log_epochs=False)
    finally:
        logger.removeHandler(handler)
    said = [line for line in handler.lines if "weighs micro-batches and ranks by their samples" in line]
    assert len(said) == (1 if says else 0)  # once for OwnLoss with K > 1; never for GPT-2
    if says:
        assert said[0].startswith("OwnLoss computes its own loss") and "compute_loss" in said[0]
