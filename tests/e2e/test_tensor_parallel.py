"""Tensor parallel and 2-D (FSDP x TP) under real torchrun with 4 ranks, against one process trained on the
same global batches: the held-out check (2-D, K=2, per-rank loaders, 4 steps; its checkpoint trained on by a
4-rank DDP Trainer), a global batch cut over the data-parallel ranks, TP with replicas, a DataLoader anndist shards, clipping's global norm, evaluation,
metrics and predict counting each sample once, items-weighted accumulation, the non-finite decision, a
transformers model split by its own plan, activation checkpointing with dropout (and compiled), the
check that a tensor-parallel group reads one batch; and the option checks at construction (no launch)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from anndist import Trainer
from support import torchrun, tp

RUNS = "held_out,global_batch,ddp_tp,fsdp_tp,items,nonfinite,mismatch,llama,gpt2,example,activation_checkpointing"
TOL = 1e-5


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    proc = torchrun("tests/support/scripts/tp_runs.py", "--out", str(out), "--runs", RUNS, nproc=4, timeout=280)
    return proc.stdout, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(4)]


@pytest.fixture(scope="module")
def ranks(launch):
    return launch[1]


def reference(batches_first: int, count: int, k: int = 2, state=None, max_norm=None, optimizer="adamw"):
    module = tp.model()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2) if optimizer == "adamw" else None
    if state is not None:
        module.load_state_dict(state)
    x, y = tp.data()
    norms = tp.one_process(module, opt, tp.global_batches(x, y, batches_first, count), k, max_norm)
    return module, opt, norms


def test_held_out_2d_then_ddp_equals_one_process(ranks):
    module, opt, _ = reference(0, 8)
    four = {k: v.clone() for k, v in module.state_dict().items()}
    x, y = tp.data()
    tp.one_process(module, opt, tp.global_batches(x, y, 8, 4), 2)
    for out in ranks:
        held = out["held_out"]
        assert held["layout"] == "2 x 2 (dp x tp)" and held["types"] == ["DTensor"] and held["steps"] == 4
        assert tp.max_diff(held["four"], four) < TOL
        assert held["ddp_steps"] == 6 and held["ddp_data"] == 4
        assert tp.max_diff(held["six"], module.state_dict()) < TOL
        assert tp.max_diff(held["six"], held["four"]) > 1e-3  # the last two steps moved the weights


def test_a_global_batch_is_cut_over_the_data_parallel_ranks_like_one_process(ranks):
    module = tp.model()
    one = tp.trainer(module, global_batch_size=tp.GLOBAL_BATCH)
    one.fit(tp.global_batch_loader(), num_epochs=2)
    assert one.state.accumulation_steps == 4 and one.global_step == 16  # 128 samples, 16 per step
    for out in ranks:
        result = out["global_batch"]
        assert result["k"] == 2 and result["steps"] == 16  # 16 = 2 micro-batches x 4 x 2 data-parallel ranks
        assert tp.max_diff(result["weights"], module.state_dict()) < TOL
        assert result["history"]["train_loss"] == pytest.approx(one.history["train_loss"], abs=TOL)
    one.close()


@pytest.mark.parametrize("run", ["ddp_tp", "fsdp_tp"])
def test_sharded_loader_reductions_clipping_evaluation_and_predict_count_each_sample_once(ranks, run):
    module, _, norms = reference(0, 16, max_norm=0.3)
    vx, vy = tp.data(37, seed=1)
    with torch.no_grad():
        outputs = module(vx)
    for rank, out in enumerate(ranks):
        result = out[run]
        assert tp.max_diff(result["weights"], module.state_dict()) < TOL
        assert len(result["norms"]) == 8 and max(abs(a - b) for a, b in zip(result["norms"], norms)) < TOL
        assert result["rounds"] == 1  # gradients reduced over "dp" once per window of K=2, not per micro-batch
        assert min(norms) > 0.3  # every step clipped: the norm decided each step's size
        val = result["eval"]
        assert val["val_loss"] == pytest.approx(nn.functional.cross_entropy(outputs, vy).item(), abs=TOL)
        assert val["val_accuracy"] == pytest.approx((outputs.argmax(1) == vy).float().mean().item())
        assert val["val_count"] == 37 and val["val_synced"] == 37  # not 74: a TP group evaluates one batch
        assert torch.allclose(result["predict"], outputs, atol=TOL)
        assert (result["predict_main"] is not None) == (rank == 0)
    assert ranks[0][run]["predict_main"].shape == (37, tp.CLASSES)


def test_items_accumulation_weighs_every_item_once(ranks):
    module = tp.model()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)  # a gradient off by a factor shows (Adam would hide it)
    x, y = tp.data()
    batches = tp.global_batches(x, y, 0, 8)
    for start in range(0, 8, 2):
        window = batches[start:start + 2]
        total = sum(int((b != 0).sum()) for _, b in window)
        for bx, by in window:
            per_item = nn.functional.cross_entropy(module(bx), by, reduction="none")
            ((per_item * (by != 0)).sum() / total).backward()
        opt.step()
        opt.zero_grad()
    for out in ranks:
        assert tp.max_diff(out["items"]["weights"], module.state_dict()) < TOL


def test_a_nonfinite_loss_with_finite_gradients_on_one_data_shard_skips_the_step_on_every_rank(ranks):
    module = tp.model()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    x, y = tp.data()
    batches = tp.global_batches(x, y, 0, 8)
    tp.one_process(module, opt, batches[:2] + batches[4:], 2)  # window 1 (batches 2, 3) skipped
    for out in ranks:
        assert out["nonfinite"]["steps"] == 3
        assert tp.max_diff(out["nonfinite"]["weights"], module.state_dict()) < TOL


def test_ranks_of_a_tp_group_reading_different_batches_is_an_error_naming_them(ranks):
    for out in ranks:
        message = out["mismatch"]["error"]
        assert message is not None and "ranks [0, 1]" in message and "data_rank" in message
        assert out["mismatch"]["steps"] == 0


def test_a_transformers_model_is_split_by_its_own_plan(ranks):
    module = tp.llama()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    for ids in tp.llama_ids():
        module(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for out in ranks:
        plan = out["llama"]["plan"]
        assert plan["model.layers.1.self_attn.q_proj"] == "ColwiseParallel"
        assert plan["model.layers.0.mlp.down_proj"] == "RowwiseParallel" and len(plan) == 16
        assert tp.max_diff(out["llama"]["weights"], module.state_dict()) < TOL


def test_gpt2_conv1d_layers_split_by_the_example_plan_equal_one_process(ranks):
    import train_gpt2
    module = tp.gpt2()
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    batches = tp.gpt2_batches()
    for start in (0, 2):
        window = batches[start:start + 2]
        total = sum(int(b["labels"][:, 1:].numel()) for b in window)
        for batch in window:
            loss, n = train_gpt2.token_loss(module, batch)
            (loss * n / total).backward()
        opt.step()
        opt.zero_grad()
    assert tp.max_diff(initial, module.state_dict()) > 0.05
    for out in ranks:
        assert out["gpt2"]["steps"] == 2
        assert tp.max_diff(out["gpt2"]["weights"], module.state_dict()) < TOL


def test_the_gpt2_example_trains_with_tp_2_and_fsdp_on_4_ranks(launch):
    output, ranks = launch
    results = [out["example"] for out in ranks]
    assert [r["global_step"] for r in results] == [12] * 4
    assert len({r["val_loss"] for r in results}) == 1
    assert output.count("after 12 optimizer steps on 4 process(es) (2 x 2 (dp x tp))") == 1
    assert math.exp(results[0]["val_loss"]) < 46 / 1.5  # well below a uniform guess over the 46-token vocabulary


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_activation_checkpointing_in_2d_leaves_gradients_unchanged(ranks, strategy):
    for out in ranks:
        runs = out["activation_checkpointing"]
        plain = runs[(strategy, "plain")]
        for name in ("ac", "compiled", "ac_compiled"):
            other = runs[(strategy, name)]
            assert all(torch.equal(a, b) for a, b in zip(plain["grads"], other["grads"])), name
            assert tp.max_diff(plain["weights"], other["weights"]) == 0.0, name
            assert other["keys"] == plain["keys"] and not any("checkpoint" in k for k in other["keys"])


# ------------------------------------------------------------------ options, checked at construction
def _trainer(model=None, **options):
    model = model if model is not None else tp.model()
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), progress_bar=False,
                   handle_signals=False, **options)


@pytest.mark.parametrize("options, error, words", [
    ({"tp_plan": tp.PLAN}, ValueError, "tp_size=1"),
    ({"tp_size": 2}, ValueError, "_tp_plan"),
    ({"tp_size": 0, "tp_plan": tp.PLAN}, ValueError, "tp_size=0"),
    ({"tp_size": True, "tp_plan": tp.PLAN}, TypeError, "tp_size"),
    ({"tp_size": 2, "tp_plan": ["fc1"]}, TypeError, "tp_plan must be"),
    ({"tp_size": 2, "tp_plan": {"fc3": "colwise"}}, ValueError, "'fc3' matches no submodule"),
    ({"tp_size": 2, "tp_plan": {"fc1": "columnwise"}}, ValueError, "'columnwise' is not a style"),
    ({"tp_size": 2, "tp_plan": {"fc1": 3}}, TypeError, "tp_plan['fc1']"),
    ({"tp_size": 2, "tp_plan": {"fc1.weight": "colwise"}}, ValueError, "names parameters"),
    ({"tp_size": 2, "tp_plan": {"fc*": "colwise", "fc1": "rowwise"}}, ValueError, "matched by two entries"),
    ({"tp_size": 2, "tp_plan": {"drop": "colwise"}}, ValueError, "is a Dropout"),
    ({"tp_size": 2, "tp_plan": tp.PLAN, "ddp_kwargs": {"bucket_cap_mb": 1}}, ValueError, "ddp_kwargs"),
    ({"tp_size": 2, "tp_plan": tp.PLAN, "use_amp": True, "amp_dtype": "fp16"}, ValueError, "fp16"),
    ({"tp_size": 2, "tp_plan": tp.PLAN}, ValueError, "must divide the number of processes, and this run has 1"),
])
def test_tp_options_are_checked_when_the_trainer_is_built(options, error, words):
    with pytest.raises(error) as raised:
        _trainer(**options)
    assert words in str(raised.value)


def test_patterns_expand_to_submodules_and_model_plans_translate():
    from torch.distributed.tensor import Replicate
    from anndist.strategies.tp_plan import check_tp_options
    deep = tp.model("deep")
    plan = check_tp_options(deep, 2, tp.BLOCK_PLAN, None, {})
    assert sorted(plan) == [f"blocks.{i}.{fc}" for i in range(3) for fc in ("fc1", "fc2")]
    llama = check_tp_options(tp.llama(), 2, None, None, {})
    assert llama["lm_head"].output_layouts == (Replicate(),)  # colwise_gather_output
    assert llama["model.embed_tokens"].input_layouts == (Replicate(),)  # embedding_rowwise
    odd = tp.model()
    odd._tp_plan = {"fc1": "packed_colwise"}
    with pytest.raises(ValueError, match=r"MLP._tp_plan\)\['fc1'\] = 'packed_colwise' is not a style"):
        check_tp_options(odd, 2, None, None, {})


def test_conv1d_styles_refuse_other_layers():
    from anndist import Conv1DColwise, Conv1DRowwise
    from transformers.pytorch_utils import Conv1D
    for style in (Conv1DColwise(), Conv1DRowwise()):
        with pytest.raises(ValueError, match="got a Linear: use 'colwise' / 'rowwise'"):
            style._apply(nn.Linear(4, 6), None)  # refused before the mesh is needed
    assert Conv1D(6, 4).weight.shape == (4, 6)  # what they split: [in_features, out_features]
