"""activation_checkpointing=True / a predicate: the chosen blocks run their forward again in the backward
(counted), and gradients and weights are those of the run without it, bit for bit, dropout included (the
recomputation replays the forward's random numbers): in one process, compiled (the eager backend, and
aot_eager, whose AOTAutograd is inductor's path), under DDP and FSDP on 2 ranks (2-D: test_tensor_parallel.py);
state dicts keep their names; which blocks True picks; bad values are errors at construction."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from anndist import Trainer
from anndist.strategies.activation_checkpointing import MainBlocks
from support import tp
from support.activation_checkpointing import same as _same, train as _train


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
