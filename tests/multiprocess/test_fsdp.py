"""strategy="fsdp" on 2 ranks: FSDP2 gives DDP's weights and gradient norms (fp32, with and without
accumulation); bf16 through FSDP's MixedPrecisionPolicy; the profile's per-rank model state;
Trainer.state_dict(). In one process (its options too): tests/unit/test_fsdp.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anndist import Callback, ProfilingCallback, Trainer
from anndist.strategies.dtensor import local
from support import full_weights, make_dataset, run_spawn
from support.callbacks import Norms, Records
from support.fsdp import deep_model, fsdp_trainer


def _train(strategy: str, k: int, rank: int, extra=(), **options) -> dict:
    """20 steps with clipping; the weights, every step's gradient norm, rank 0's step records, the profile."""
    model = deep_model(seed=rank)  # different weights per rank: both strategies take rank 0's
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # built before the Trainer
    if strategy == "fsdp":
        options["shard_modules"] = lambda m: isinstance(m, nn.Linear)
    norms, records, profile = Norms(), Records(log_interval=5), ProfilingCallback()
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), strategy=strategy, gradient_accumulation_steps=k,
                      max_grad_norm=0.5, seed=0, progress_bar=False, handle_signals=False,
                      callbacks=[norms, records, profile, *extra], **options)
    trainer.fit(DataLoader(make_dataset(96), batch_size=4, shuffle=True), max_steps=20)
    assert trainer.global_step == 20
    return {"weights": full_weights(trainer.module), "norms": norms.norms, "history": trainer.history,
            "records": [r for r in records.records if r["kind"] == "step"], "profile": profile.summaries,
            "dtypes": {(type(p).__name__, p.dtype) for p in trainer.module.parameters()},
            "optimizer_dtypes": {v.dtype for st in optimizer.state.values() for v in st.values() if v.dim()}}


class DtypeSpy(Callback):
    """What a sharded Linear computes in: its input and (unsharded) weight in a forward pre-hook, its output."""

    def __init__(self):
        self.pre, self.out, self.grads = set(), set(), set()

    def on_train_begin(self, trainer, logs=None):
        layer = trainer.module[2]
        layer.register_forward_pre_hook(lambda m, args: self.pre.add((args[0].dtype, m.weight.dtype)))
        layer.register_forward_hook(lambda m, args, out: self.out.add(out.dtype))

    def on_backward_end(self, batch_idx, trainer, logs=None):
        self.grads |= {local(p.grad).dtype for p in trainer.module.parameters() if p.grad is not None}


def _bf16(rank: int) -> dict:
    spy = DtypeSpy()
    out = {"fsdp": _train("fsdp", 1, rank, extra=[spy], use_amp=True), "ddp": _train("ddp", 1, rank, use_amp=True)}
    out["spy"] = (spy.pre, spy.out, spy.grads)
    return out


def _state_dict_round_trip() -> dict:
    """Trainer.state_dict() after 6 steps, through torch.save, into a Trainer built from other weights."""
    import io
    loader = DataLoader(make_dataset(96), batch_size=4)
    saved, fresh = fsdp_trainer(0), fsdp_trainer(1)
    saved.fit(loader, max_steps=6)
    state, buffer, at_6 = saved.state_dict(), io.BytesIO(), full_weights(saved.module)
    torch.save(state, buffer)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    loaded = full_weights(fresh.module)
    saved.fit(loader, max_steps=9)  # both go on for 3 steps: the same only if Adam's moments and steps came back
    fresh.fit(loader, max_steps=9)
    return {"keys": sorted(state), "model": {k: (type(v).__name__, tuple(v.shape)) for k, v in state["model"].items()},
            "optimizer": sorted(state["optimizer"].get("state", {})), "at_6": at_6, "loaded": loaded,
            "step": fresh.global_step, "went_on": (full_weights(saved.module), full_weights(fresh.module))}


def _both_strategies(rank: int, world_size: int) -> dict:
    from torch.distributed.tensor import DTensor
    out = {}
    for k in (1, 3):
        out[("ddp", k)] = _train("ddp", k, rank)
        out[("fsdp", k)] = _train("fsdp", k, rank)
    out["bf16"] = _bf16(rank)
    out["state_dict"] = _state_dict_round_trip()
    model = deep_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                      strategy="fsdp", progress_bar=False, handle_signals=False)
    out["sharded"] = all(isinstance(p, DTensor) for p in trainer.module.parameters())
    out["optimizer_bound"] = all(p is q for p, q in zip(trainer.optimizer.param_groups[0]["params"],
                                                         trainer.module.parameters()))
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_spawn(_both_strategies, 2)


@pytest.mark.parametrize("k", [1, 3])
def test_fsdp_weights_equal_ddp(ranks, k):
    for out in ranks:
        ddp, fsdp = out[("ddp", k)]["weights"], out[("fsdp", k)]["weights"]
        assert ddp.keys() == fsdp.keys()
        initial = deep_model(seed=0).state_dict()
        for name in ddp:
            assert not torch.equal(ddp[name], initial[name])  # it trained
            torch.testing.assert_close(fsdp[name], ddp[name], rtol=0, atol=1e-6)
    for name in ranks[0][("fsdp", k)]["weights"]:
        assert torch.equal(ranks[0][("fsdp", k)]["weights"][name], ranks[1][("fsdp", k)]["weights"][name])


@pytest.mark.parametrize("k", [1, 3])
def test_grad_norm_is_the_global_norm_on_every_rank_and_in_the_records(ranks, k):
    """clip_grad_norm_ on sharded gradients: the same norm on both ranks, DDP's norm, and what rank 0 logs."""
    fsdp = [out[("fsdp", k)] for out in ranks]
    ddp = ranks[0][("ddp", k)]["norms"]
    assert sorted(fsdp[0]["norms"]) == list(range(1, 21)) and fsdp[0]["norms"] == fsdp[1]["norms"]
    assert any(norm > 0.5 for norm in fsdp[0]["norms"].values())  # clipping acted
    for step, norm in fsdp[0]["norms"].items():
        assert norm == pytest.approx(ddp[step], rel=1e-5), step
    records = fsdp[0]["records"]  # written on rank 0 only
    assert [r["step"] for r in records] == [5, 10, 15, 20] and fsdp[1]["records"] == []
    assert all(r["grad_norm"] == fsdp[0]["norms"][r["step"]] for r in records)


def test_profile_reports_each_ranks_shards_of_model_state(ranks):
    """ProfilingCallback's model state per rank: under FSDP each rank's shards (summing to one DDP copy)."""
    fsdp, ddp = ranks[0][("fsdp", 1)]["profile"], ranks[0][("ddp", 1)]["profile"]
    params = sum(p.numel() for p in deep_model().parameters()) * 4
    assert [s["rank"] for s in fsdp] == [0, 1]
    for s in ddp:  # whole copies: fp32 parameters and gradients, AdamW's two moments and a step count each
        assert s["model_state"] == {"parameters": params, "gradients": params, "optimizer": 2 * params + 6 * 4}
    for kind in ("parameters", "gradients"):
        assert sum(s["model_state"][kind] for s in fsdp) == params
        assert all(0 < s["model_state"][kind] < params for s in fsdp)
    assert sum(s["model_state"]["optimizer"] for s in fsdp) == 2 * params + 2 * 6 * 4  # the step counts: per rank
    from anndist.callbacks.profile_report import format_table
    assert "model state 0.0 MiB (params+grads+optimizer, this rank)" in format_table(fsdp)


def test_fsdp_bf16_equals_ddp_autocast_and_stays_near_fp32(ranks):
    """use_amp=True: FSDP through MixedPrecisionPolicy(bf16, reduce fp32) computes what DDP under bf16
    autocast computes (1e-5), and both stay near the fp32 run: loss within 0.01, weights within half of
    how far they moved (Adam's normalised steps turn bf16's rounding into visible weight differences)."""
    initial, fp32 = deep_model(seed=0).state_dict(), ranks[0][("ddp", 1)]
    for out in ranks:
        fsdp, ddp = out["bf16"]["fsdp"], out["bf16"]["ddp"]
        for name, reference in fp32["weights"].items():
            torch.testing.assert_close(fsdp["weights"][name], ddp["weights"][name], rtol=0, atol=1e-5)
            moved = (reference - initial[name]).norm()
            assert (fsdp["weights"][name] - reference).norm() < 0.5 * moved, name
        assert fsdp["history"]["train_loss"] == pytest.approx(fp32["history"]["train_loss"], abs=0.01)


def test_fsdp_bf16_computes_in_bf16_and_keeps_fp32_weights(ranks):
    from torch.distributed.tensor import DTensor
    for out in ranks:
        pre, outputs, grads = out["bf16"]["spy"]
        assert pre == {(torch.bfloat16, torch.bfloat16)}  # inputs cast, the unsharded weight in bf16
        assert outputs == {torch.bfloat16}
        assert grads == {torch.float32}  # reduced in fp32 (reduce_dtype) into the fp32 shards
        fsdp = out["bf16"]["fsdp"]
        assert fsdp["dtypes"] == {(DTensor.__name__, torch.float32)}
        assert fsdp["optimizer_dtypes"] == {torch.float32}
        assert all(torch.isfinite(torch.tensor(fsdp["history"]["train_loss"])))


def test_trainer_state_dict_holds_the_whole_model_and_optimizer(ranks):
    """Under FSDP: gathered to rank 0 (plain full tensors, the optimizer keyed by name), empty on rank 1;
    loaded on both ranks into a Trainer built from other weights, it gives the same weights and the same
    next 3 steps (Adam's moments and step counts came back)."""
    zero, one = ranks[0]["state_dict"], ranks[1]["state_dict"]
    names = list(deep_model().state_dict())
    shapes = {k: ("Tensor", tuple(v.shape)) for k, v in deep_model().state_dict().items()}
    assert zero["keys"] == one["keys"] == ["callbacks", "model", "optimizer", "scaler", "train_state"]
    assert zero["model"] == shapes and zero["optimizer"] == sorted(names)
    assert one["model"] == {} and one["optimizer"] == []
    for out in (zero, one):
        assert out["step"] == 9
        for name in names:
            assert torch.equal(out["loaded"][name], out["at_6"][name])
            assert torch.equal(out["went_on"][0][name], out["went_on"][1][name])
            assert not torch.equal(out["went_on"][0][name], out["at_6"][name])


def test_parameters_are_sharded_and_the_optimizer_rebound(ranks):
    assert all(out["sharded"] and out["optimizer_bound"] for out in ranks)
