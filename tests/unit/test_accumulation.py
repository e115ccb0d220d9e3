"""Gradient accumulation is exact in one process: K micro-batches give the weights of one large batch."""
import pytest
import torch

from support.accumulation import K, train_anndist, train_reference


def test_single_process_equals_large_batch_training():
    result = train_anndist(1, batch_size=8, k=K)  # 60 samples: windows of 24, 24 and 12 (8 + 4)
    reference, train_loss = train_reference(window=8 * K)
    torch.testing.assert_close(result["params"], reference, rtol=1e-5, atol=1e-6)
    assert result["train_loss"] == pytest.approx(train_loss, rel=1e-5)
