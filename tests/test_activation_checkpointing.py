"""activation_checkpointing=True / a predicate: the chosen blocks run their forward again in the backward
(counted), and gradients and weights are those of the run without it, bit for bit, dropout included (the
recomputation replays the forward's random numbers): in one process, compiled (the eager backend, and
aot_eager, whose AOTAutograd is inductor's path), under DDP and FSDP on 2 ranks (2-D: test_tensor_parallel.py);
state dicts keep their names; which blocks True picks; bad values are errors at construction."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tp_support as tp
from anndist import Callback, Trainer
from anndist.strategies.activation_checkpointing import MainBlocks
from anndist.strategies.dtensor import local
from spawn_ranks import run_spawn


class FirstGrads(Callback):
    """The local gradients at the end of the first window's backward, and the blocks' forwards until then."""

    def __init__(self) -> None:
        self.grads, self.calls = None, None

    def on_train_begin(self, trainer, logs=None):
        tp.Block.calls = 0

    def on_backward_end(self, batch_idx, trainer=None, logs=None):
        if logs["ends_window"] and self.grads is None:
            self.grads = [local(p.grad).detach().clone() for p in trainer.module.parameters()]
            self.calls = tp.Block.calls


def _train(rank: int = 0, **options) -> dict:
    tp.Block.counting = "compile" not in options
    grads = FirstGrads()
    module = tp.model("deep", dropout=0.3)
    trainer = Trainer(module, torch.optim.SGD(module.parameters(), lr=0.1), nn.CrossEntropyLoss(), seed=0,
                      gradient_accumulation_steps=2, progress_bar=False, handle_signals=False, callbacks=[grads],
                      **options)
    x, y = tp.data(64)
    batches = tp.rank_batches(tp.global_batches(x, y, 0, 8), trainer.strategy.data_rank,
                              trainer.strategy.data_world_size)
    trainer.fit(batches, num_epochs=1)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(trainer.module, options=StateDictOptions(full_state_dict=True))
    return {"grads": grads.grads, "calls": grads.calls, "weights": {k: v.detach().clone() for k, v in weights.items()},
            "keys": list(trainer.module.state_dict()), "steps": trainer.global_step}


def _same(a: dict, b: dict) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a["grads"], b["grads"]))
    assert a["weights"].keys() == b["weights"].keys()
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert a["keys"] == b["keys"] and a["steps"] == b["steps"] == 4


@pytest.fixture(scope="module")
def one_process() -> dict:
    return {"plain": _train(), "ac": _train(activation_checkpointing=True),
            "linears": _train(activation_checkpointing=lambda m: isinstance(m, nn.Linear)),
            "compiled": _train(compile={"backend": "eager"}),
            "ac_compiled": _train(activation_checkpointing=True, compile={"backend": "eager"}),
            "aot": _train(compile={"backend": "aot_eager"}),
            "ac_aot": _train(activation_checkpointing=True, compile={"backend": "aot_eager"})}


def test_checkpointed_blocks_are_recomputed_and_gradients_do_not_change(one_process):
    plain, ac = one_process["plain"], one_process["ac"]
    assert plain["calls"] == 3 * 2  # 3 blocks, 2 micro-batches in the window
    assert ac["calls"] == 3 * 2 * 2  # and each forward once more in the backward
    _same(plain, ac)
    assert not any("checkpoint" in key or "_orig_mod" in key for key in ac["keys"])


def test_a_predicate_checkpoints_the_modules_it_accepts(one_process):
    result = one_process["linears"]  # the Linear layers, inside the blocks and around them; not the blocks
    assert result["calls"] == one_process["plain"]["calls"]
    _same(one_process["plain"], result)


@pytest.mark.parametrize("backend", ["compiled", "aot"])
def test_compiled_gradients_do_not_change(one_process, backend):
    _same(one_process[backend], one_process[f"ac_{backend}"])
    _same(one_process["plain"], one_process[f"ac_{backend}"])


def _ddp_and_fsdp(rank: int, world_size: int) -> dict:
    out = {}
    for strategy in ("ddp", "fsdp"):
        options = {"strategy": strategy}
        out[strategy] = {"plain": _train(**options), "ac": _train(activation_checkpointing=True, **options),
                         "ac_compiled": _train(activation_checkpointing=True, compile={"backend": "eager"}, **options)}
    return out


def test_under_ddp_and_fsdp_gradients_do_not_change():
    for out in run_spawn(_ddp_and_fsdp, 2, timeout=240):
        for strategy in ("ddp", "fsdp"):
            runs = out[strategy]
            assert runs["ac"]["calls"] == 2 * runs["plain"]["calls"]
            _same(runs["plain"], runs["ac"])
            _same(runs["plain"], runs["ac_compiled"])


def test_true_picks_the_main_module_list_or_the_top_level_children():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=20, n_positions=8))
    assert repr(MainBlocks(gpt2)) == "MainBlocks(the items of transformer.h: 2 blocks)"
    assert repr(MainBlocks(tp.llama())) == "MainBlocks(the items of model.layers: 2 blocks)"
    flat = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    assert repr(MainBlocks(flat)) == "MainBlocks(the top-level children: 3 blocks)"


@pytest.mark.parametrize("value, error, words", [
    ("yes", TypeError, "activation_checkpointing must be"),
    (nn.Linear(2, 2), TypeError, "activation_checkpointing must be"),
    (lambda m: False, ValueError, "accepted no submodule"),
])
def test_bad_values_are_errors_at_construction(value, error, words):
    module = tp.model("deep")
    with pytest.raises(error, match=words):
        Trainer(module, torch.optim.SGD(module.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                activation_checkpointing=value, progress_bar=False, handle_signals=False)


def test_a_second_trainer_on_the_same_model_does_not_checkpoint_twice():
    module = tp.model("deep")
    for _ in range(2):
        trainer = Trainer(module, torch.optim.SGD(module.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                          activation_checkpointing=True, progress_bar=False, handle_signals=False)
    tp.Block.calls, tp.Block.counting = 0, True
    trainer.model(torch.randn(2, tp.FEATURES)).sum().backward()
    assert tp.Block.calls == 3 * 2
