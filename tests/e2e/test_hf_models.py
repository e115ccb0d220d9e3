"""Hugging Face models through the Trainer under real torchrun (2 ranks, gloo): a GPT-2 language model
with token-weighted accumulation (``compute_loss`` returning ``(loss, num_tokens)``) and a BERT
classifier with its own loss and torchmetrics' F1, each stopped mid-epoch and resumed bit for bit.

One torchrun launch of tests/support/scripts/hf_train.py serves every test, the example's included
(transformers takes seconds to import, so launches are few).
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

# find_spec rather than importorskip: the models run in torchrun's workers, and importing transformers
# here as well would cost the suite seconds for nothing.
for _package in ("transformers", "torchmetrics"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"the Hugging Face tests need {_package} (pip install '.[hf]')", allow_module_level=True)

from support import ROOT, torchrun  # noqa: E402

SCRIPT = ROOT / "tests" / "support" / "scripts" / "hf_train.py"
JOBS = ("gpt2", "bert")
STOP_AT = {"gpt2": 9, "bert": 8}  # as in the script
STEPS_PER_EPOCH = {"gpt2": 7, "bert": 6}  # 13 and 11 micro-batches per rank, K=2
EPOCHS = 3


@contextlib.contextmanager
def _once(tmp: Path):
    """Under pytest-xdist both workers may need the launch: the first makes it, the other waits and reads."""
    with open(tmp / "launch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield tmp / "launch.done"


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> dict:
    """torchrun's exit code and output, and each rank's results (None for a rank that wrote none)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        tmp = tmp_path_factory.getbasetemp().parent / "hf_models"  # this session's, shared by its workers
        tmp.mkdir(exist_ok=True)
    else:
        tmp = tmp_path_factory.mktemp("hf_models")
    with _once(tmp) as done:
        if not done.exists():
            proc = torchrun(SCRIPT, "--out", str(tmp), nproc=2, timeout=300, check=False)
            (tmp / "output.txt").write_text(proc.stdout + proc.stderr)
            done.write_text(str(proc.returncode))
    ranks = [tmp / f"rank{r}.pt" for r in (0, 1)]
    return {"returncode": int(done.read_text()), "output": (tmp / "output.txt").read_text(), "tmp": tmp,
            "ranks": [torch.load(p, weights_only=False) if p.exists() else None for p in ranks]}


@pytest.fixture(scope="module")
def ranks(launch) -> list[dict]:
    if None in launch["ranks"]:
        pytest.fail(f"a rank wrote no results (torchrun exited {launch['returncode']}):\n{launch['output'][-4000:]}")
    return launch["ranks"]


def test_every_rank_finishes_every_run_and_exits_zero(launch, ranks):
    assert launch["returncode"] == 0, launch["output"][-4000:]  # torchrun: 0 only when every worker exited 0
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["finished"] and r["world_size"] == 2 for r in ranks)


@pytest.mark.parametrize("job", JOBS)
def test_stopped_mid_epoch_and_resumed_run_is_bit_identical_to_the_full_run(ranks, job):
    for rank in ranks:
        full, stopped, resumed = (rank[f"{job}/{kind}"] for kind in ("full", "stopped", "resumed"))
        # The stop set after step s lands after s+1 on 2 ranks (stop_check_period=0), inside epoch 1.
        steps_into_epoch = STOP_AT[job] + 1 - STEPS_PER_EPOCH[job]
        assert stopped["end"] == {"epoch": 1, "global_step": STOP_AT[job] + 1, "batch_in_epoch": 2 * steps_into_epoch}
        assert resumed["begin"] == stopped["end"]
        assert full["end"] == resumed["end"] == {"epoch": EPOCHS, "global_step": EPOCHS * STEPS_PER_EPOCH[job],
                                                 "batch_in_epoch": 0}
        assert torch.equal(resumed["params"], full["params"])
        assert not torch.equal(stopped["params"], full["params"])  # the comparison has teeth
        assert resumed["history"] == full["history"]  # the epoch cut by the stop included
    assert torch.equal(ranks[0][f"{job}/full"]["params"], ranks[1][f"{job}/full"]["params"])


@pytest.mark.parametrize("job", JOBS)
def test_training_lowers_the_loss(ranks, job):
    history = ranks[0][f"{job}/full"]["history"]
    assert len(history["train_loss"]) == len(history["val_loss"]) == EPOCHS
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert history["val_loss"][-1] < history["val_loss"][0]


def test_gpt2_val_loss_weighs_every_token_of_the_dataset_once(ranks):
    """The final val_loss (2 ranks, padded batches) equals the mean over all tokens, one process."""
    full = ranks[0]["gpt2/full"]
    sums, tokens = zip(*full["val_sequences"])
    by_token = sum(sums) / sum(tokens)
    by_sequence = sum(s / t for s, t in full["val_sequences"]) / len(tokens)
    assert full["history"]["val_loss"][-1] == pytest.approx(by_token, rel=1e-5)
    assert abs(by_sequence - by_token) > 1e-3  # sequence-weighted would be told apart


def test_val_f1_is_identical_on_both_ranks_and_matches_predict(ranks):
    histories = [r["bert/full"]["history"] for r in ranks]
    assert len(histories[0]["val_f1"]) == EPOCHS
    assert histories[0]["val_f1"] == histories[1]["val_f1"]
    full = ranks[0]["bert/full"]
    predictions, labels = full["predictions"], full["val_labels"]
    assert predictions.shape == (len(labels), 3)
    assert torch.equal(predictions, ranks[1]["bert/full"]["predictions"])
    # predict() is in dataset order: its macro F1 against the labels is the final epoch's val_f1
    predicted = predictions.argmax(dim=1)
    f1s = []
    for c in range(3):
        tp = ((predicted == c) & (labels == c)).sum().item()
        fp, fn = ((predicted == c) & (labels != c)).sum().item(), ((predicted != c) & (labels == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    assert histories[0]["val_f1"][-1] == pytest.approx(sum(f1s) / 3, abs=1e-6)
    assert 0 < histories[0]["val_f1"][-1] < 1  # neither degenerate: a wrong order would not match


def test_gpt2_example_stops_both_ranks_after_max_steps_and_learns(launch, ranks):
    """launch/train_gpt2.py's main() with --max-steps 5 (K=3) on 2 ranks; the entry script itself is
    the same function behind ``if __name__ == "__main__"`` and @record."""
    example = [r["example"] for r in ranks]
    assert [e["global_step"] for e in example] == [5, 5]  # the stop was set a step early: 2 ranks agree late
    assert (launch["tmp"] / "example-ckpt" / "step-000000005.ckpt").exists()
    assert example[0]["val_loss"] == example[1]["val_loss"]
    assert "after 5 optimizer steps on 2 process(es)" in launch["output"]  # the perplexity line, once
    assert math.exp(example[0]["val_loss"]) < 46  # below a uniform guess over the 46-token vocabulary: it learned
