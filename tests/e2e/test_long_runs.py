"""Long runs under torchrun: streams whose shards differ between ranks, stateful and plain loaders
preempted and resumed."""
from __future__ import annotations

import re

import pytest
import torch

from support import ROOT, child_env, torchrun

STREAM = ROOT / "tests" / "support" / "scripts" / "stream_train.py"


def _torchrun_stream(tmp_path, name, *args):
    return torchrun(STREAM, *args, "--out", str(tmp_path / f"{name}.pt"), timeout=240, check=False,
                    env=child_env())


def test_streams_of_unequal_length_end_together_and_a_stateful_loader_resumes_exactly(tmp_path):
    """Rank 1's stream is two batches longer: every epoch ends at the same step on both ranks. SIGUSR1
    to rank 1 mid-epoch: every rank saves and exits 75; the restart resumes the StatefulDataLoader
    where it was and ends bit-identical to the uninterrupted run."""
    pytest.importorskip("torchdata", reason="torchdata (the 'stream' extra) provides StatefulDataLoader")
    reference = _torchrun_stream(tmp_path, "reference", "--loader", "stateful")
    assert reference.returncode == 0, reference.stderr
    ckpt = tmp_path / "ckpt"
    first = _torchrun_stream(tmp_path, "first", "--loader", "stateful", "--signal-step", "3", "--checkpoint-dir", str(ckpt))
    assert re.findall(r"exitcode\s+: (-?\d+)", first.stderr) == ["75", "75"], first.stderr  # every rank
    assert "SIGUSR1 received: every rank stopped after optimizer step 4" in first.stderr
    second = _torchrun_stream(tmp_path, "second", "--loader", "stateful", "--checkpoint-dir", str(ckpt))
    assert second.returncode == 0, second.stderr
    expected, resumed = torch.load(tmp_path / "reference.pt"), torch.load(tmp_path / "second.pt")
    assert expected["steps"] == resumed["steps"] == [10, 10]  # 5 windows of K=2 per epoch, 2 epochs
    assert torch.equal(expected["params"], resumed["params"])
    assert expected["history"] == resumed["history"]


def test_a_plain_iterable_preempted_mid_epoch_repeats_the_epoch_and_says_so(tmp_path):
    ckpt = tmp_path / "ckpt"
    first = _torchrun_stream(tmp_path, "first", "--loader", "plain", "--signal-step", "3", "--checkpoint-dir", str(ckpt))
    assert re.findall(r"exitcode\s+: (-?\d+)", first.stderr) == ["75", "75"], first.stderr
    second = _torchrun_stream(tmp_path, "second", "--loader", "plain", "--checkpoint-dir", str(ckpt))
    assert second.returncode == 0, second.stderr
    assert "cannot start an epoch part-way, so epoch 0 is repeated from its start: 8 micro-batch(es)" in second.stderr
    assert torch.load(tmp_path / "second.pt")["steps"] == [14, 14]  # 4 before the stop, then 2 whole epochs
