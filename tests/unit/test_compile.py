"""Trainer(compile=...): one compiled scenario (a compile costs ~50 s here), shared by the assertions.

The scenario, in one process on the CPU (inductor, which needs a C compiler):
  A  compiled, 2 epochs, saves ``a.ckpt``; evaluates and predicts with the compiled module
  E  eager, 1 epoch, saves ``e.ckpt``
  C  compiled, resumes ``e.ckpt`` for 1 more epoch;  R  eager, resumes ``e.ckpt`` for 1 more epoch
Compiled kernels may round differently in the last bits from eager ones, so C and R are compared to a
float tolerance (rtol 1e-5, atol 1e-6), not bit for bit.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Trainer
from anndist.checkpoint.states import COMPILE_PREFIX, strip_compile_prefix
from anndist.strategies.compile import check_compile
from support import flat_params, make_dataset, make_model

OPTIONS = dict(seed=0, handle_signals=False, progress_bar=False)


def _trainer(compile_: bool | dict, model: nn.Module | None = None) -> Trainer:
    model = model or make_model()
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), compile=compile_,
                   **OPTIONS)


def _loader() -> DataLoader:
    return DataLoader(make_dataset(64), batch_size=16, shuffle=True)  # 64 / 16: one batch shape


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile")
    calls = []
    a = _trainer(True)
    a.strategy.forward_module.register_forward_pre_hook(lambda mod, args: calls.append(1))
    handler = _Records()
    logging.getLogger("anndist").addHandler(handler)
    try:
        a.fit(_loader(), num_epochs=2)
    finally:
        logging.getLogger("anndist").removeHandler(handler)
    out = {"a": a, "a_ckpt": a.save_checkpoint(tmp / "a.ckpt"), "train_calls": len(calls), "logs": handler.lines}
    calls.clear()
    out["eval"] = a.evaluate(DataLoader(make_dataset(32, seed=1), batch_size=16))
    out["predict"] = a.predict(DataLoader(make_dataset(32, seed=1), batch_size=16))
    out["eval_calls"] = len(calls)
    e = _trainer(False)
    e.fit(_loader(), num_epochs=1)
    e_ckpt = e.save_checkpoint(tmp / "e.ckpt")
    out["c"], out["r"] = _trainer(True), _trainer(False)
    for trainer in (out["c"], out["r"]):
        trainer.fit(_loader(), num_epochs=2, resume_from=e_ckpt)
    return out


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_compiled_checkpoint_has_clean_keys_and_loads_into_an_eager_trainer(scenario):
    saved = torch.load(scenario["a_ckpt"], weights_only=True)["states"]["model"]
    assert saved and not any(COMPILE_PREFIX in key for key in saved)
    assert set(saved) == set(make_model().state_dict())
    eager = _trainer(False)
    eager.load_checkpoint(scenario["a_ckpt"])
    assert torch.equal(flat_params(eager.module), flat_params(scenario["a"].module))
    assert eager.global_step == scenario["a"].global_step == 8


def test_the_trainer_keeps_the_original_module_and_calls_the_compiled_one(scenario):
    a = scenario["a"]
    assert type(a.module) is nn.Sequential and a.strategy.forward_module._orig_mod is a.module
    assert a.model is a.strategy.forward_module  # one process: no DDP
    assert scenario["train_calls"] == 8  # every micro-batch went through the compiled module


def test_evaluate_and_predict_run_compiled(scenario):
    assert scenario["eval_calls"] == 4  # two batches each
    a = scenario["a"]
    with torch.no_grad():
        x = make_dataset(32, seed=1).tensors[0]
        eager = a.module(x)
    torch.testing.assert_close(scenario["predict"], eager, rtol=1e-5, atol=1e-6)
    assert scenario["eval"]["val_loss"] == pytest.approx(
        nn.functional.cross_entropy(eager, make_dataset(32, seed=1).tensors[1]).item(), rel=1e-5)


def test_an_eager_checkpoint_resumes_a_compiled_run_like_an_eager_one(scenario):
    c, r = scenario["c"], scenario["r"]
    assert c.global_step == r.global_step == 8
    torch.testing.assert_close(flat_params(c.module), flat_params(r.module), rtol=1e-5, atol=1e-6)
    assert not torch.equal(flat_params(c.module), flat_params(make_model()))  # it trained


def test_compile_time_and_recompilations_are_logged_once(scenario):
    lines = scenario["logs"]
    first = [line for line in lines if "first optimizer step took" in line]
    again = [line for line in lines if "recompilation(s)" in line]
    assert len(first) == 1 and len(again) == 1, lines


def test_a_model_compiled_by_the_user_is_taken_apart():
    model = make_model()
    compiled = torch.compile(model)  # nothing is compiled until it is called
    trainer = _trainer(False, compiled)
    assert trainer.module is model and trainer.strategy.forward_module is compiled
    assert not any(COMPILE_PREFIX in key for key in trainer.state_dict()["model"])


def test_compile_option_is_validated():
    assert check_compile(False) is None and check_compile(True) == {}
    assert check_compile({"mode": "reduce-overhead"}) == {"mode": "reduce-overhead"}
    with pytest.raises(TypeError, match="compile must be True, False or a dict"):
        _trainer("yes")
    with pytest.raises(ValueError, match=r"\['fullgrpah'\] are not torch.compile parameters"):
        _trainer({"fullgrpah": True})


def test_prefixed_keys_from_elsewhere_load():
    state = {f"{COMPILE_PREFIX}0.weight": torch.ones(1), "1.bias": torch.zeros(1)}
    assert list(strip_compile_prefix(state)) == ["0.weight", "1.bias"]
    trainer = _trainer(False)
    prefixed = {f"{COMPILE_PREFIX}{k}": v + 1 for k, v in trainer.module.state_dict().items()}
    trainer.load_state_dict({"model": prefixed})
    assert torch.equal(trainer.module[0].bias, prefixed[f"{COMPILE_PREFIX}0.bias"])
