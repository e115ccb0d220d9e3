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


def test_the_verdict_names_the_ranks_behind_and_groups_the_counts():
    from anndist.callbacks.watchdog import judge
    assert judge({0: "12", 1: "11", 2: "12", 3: "12"}, 4) == "1;rank 1 at 11, ranks 0, 2-3 at 12"
    assert judge({0: "12", 2: "12"}, 4) == "1,3;ranks 0, 2 at 12, ranks 1, 3 unknown"  # never posted: behind
    assert judge({0: "5", 1: "5"}, 2) == ";ranks 0-1 at 5"  # equal counts: they hang together
    many = {r: "7" for r in range(8192) if r != 4000}
    assert judge(many, 8192) == "4000;ranks 0-3999, 4001-8191 at 7, rank 4000 unknown"  # one short line at any size
