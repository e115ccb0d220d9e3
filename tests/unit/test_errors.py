"""torch's errors explained in anndist's terms (``anndist/errors.py``)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from anndist.strategies.ddp_errors import explain_ddp_error, raise_explained


class PartlyUsed(nn.Module):
    """``spare`` takes no part in the output, so DDP never sees a gradient for it."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.spare, self.last = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.last(self.first(x))


@pytest.fixture
def one_rank_group():
    """A gloo group of one process, torn down after the test so no other test sees it."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def ddp_unused_parameter_error() -> tuple[nn.Module, RuntimeError]:
    model = nn.parallel.DistributedDataParallel(PartlyUsed())
    for _ in range(2):  # DDP notices the missing gradients when the next step starts
        try:
            model(torch.randn(3, 4)).sum().backward()
        except RuntimeError as exc:
            return model, exc
    raise AssertionError("DDP did not complain about the unused parameters")


def test_unused_parameters_point_at_ddp_kwargs_and_name_the_parameters(one_rank_group):
    model, exc = ddp_unused_parameter_error()
    assert "find_unused_parameters=True" in str(exc) and "ddp_kwargs" not in str(exc)  # torch's own advice
    for given in (model, model.module):
        explained = explain_ddp_error(exc, given)
        assert isinstance(explained, RuntimeError)
        assert "ddp_kwargs={'find_unused_parameters': True} to the Trainer" in str(explained)
        assert "on rank 0: spare.weight, spare.bias." in str(explained)
    assert "on rank 0." in str(explain_ddp_error(exc))  # no model: no names, the advice all the same
    with pytest.raises(RuntimeError, match="ddp_kwargs=") as info:
        raise_explained(exc, model)
    assert info.value.__cause__ is exc  # torch's original stays in the chain


def test_other_errors_are_left_alone():
    assert explain_ddp_error(RuntimeError("CUDA out of memory")) is None
    assert explain_ddp_error(ValueError("find_unused_parameters=True")) is None
    original = RuntimeError("CUDA out of memory")
    with pytest.raises(RuntimeError) as info:
        raise_explained(original, nn.Linear(1, 1))
    assert info.value is original
