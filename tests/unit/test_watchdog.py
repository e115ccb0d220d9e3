"""The watchdog's options and NCCL's flight recorder variables (the hung-rank job: tests/e2e/test_watchdog.py)."""
import pytest

from anndist import Trainer
from anndist.dist.flight_recorder import enable_flight_recorder, flight_recorder_env
from support import make_model

import torch


def test_flight_recorder_variables_only_for_nccl_and_never_over_the_users(tmp_path):
    assert flight_recorder_env("gloo", tmp_path, {}) == {}
    wanted = flight_recorder_env("cpu:gloo,cuda:nccl", tmp_path, {"TORCH_NCCL_TRACE_BUFFER_SIZE": "5"})
    assert wanted == {"TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                      "TORCH_FR_DUMP_TEMP_FILE": str(tmp_path.resolve() / "nccl_trace_rank_")}
    environ = {}
    enable_flight_recorder("nccl", tmp_path / "ckpt", environ)
    assert environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and (tmp_path / "ckpt").is_dir()


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1, ValueError), (float("inf"), ValueError),
                                          (True, TypeError), ("10", TypeError)])
def test_watchdog_timeout_must_be_positive_seconds(value, error):
    model = make_model()
    with pytest.raises(error, match="watchdog_timeout"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), watchdog_timeout=value)
