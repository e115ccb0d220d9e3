"""strategy="fsdp" end to end: the digits example under torchrun saves whole tensors."""
from __future__ import annotations

import torch

from support import ROOT, torchrun


def test_digits_example_with_fsdp_under_torchrun(tmp_path):
    out = tmp_path / "digits.pt"
    proc = torchrun(ROOT / "launch" / "train_digits.py", "--strategy", "fsdp", "--max-steps", "30",
                    "--no-progress-bar", "--save", str(out), timeout=300)
    assert proc.returncode == 0
    weights = torch.load(out, weights_only=True)  # whole tensors, gathered from the shards
    assert all(not hasattr(w, "to_local") for w in weights.values())
    model_shapes = {k: v.shape for k, v in __import__("train_digits").digits_model().state_dict().items()}
    assert {k: v.shape for k, v in weights.items()} == model_shapes
