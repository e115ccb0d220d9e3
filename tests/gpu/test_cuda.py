"""The CUDA paths on a real GPU: precision (fp32, bf16, fp16 with its scaler), exact resume with the
CUDA RNG, profiling with CUDA events, evaluation and predict, pinned non-blocking copies, a 1-rank
NCCL group, 2 ranks sharing one GPU through gloo, 2 ranks on 2 GPUs with NCCL, torch.compile, and
asynchronous checkpoints staged out of GPU memory.

Every test is marked ``cuda`` and skipped where ``torch.cuda.is_available()`` is False (CI, laptops).
On a GPU machine: ``bash tests/gpu/run.sh`` (installs, runs these, benchmarks, prints one table), or
``python -m pytest -m cuda -rs tests/gpu/test_cuda.py``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

# cuBLAS picks the same kernels run after run with a fixed workspace: the bit-for-bit comparisons
# below (resume, pinned vs pageable copies) need it. It must be set before cuBLAS starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from anndist import Callback, ProfilingCallback, Trainer  # noqa: E402
from anndist.callbacks import ModelCheckpoint  # noqa: E402
from anndist.step.precision import ScaledPrecision  # noqa: E402
from support import child_env, flat_params, make_dataset, make_model, torchrun  # noqa: E402
from support.dcp_runs import WeightsAt, dcp_loader, dcp_trainer  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA device: torch.cuda.is_available() is False (CPU-only machine or torch "
                              "build); run on a GPU machine with bash tests/gpu/run.sh"),
]

RANKS = Path(__file__).with_name("ranks.py")
CUDA0 = "cuda:0"
OPTIONS = {"progress_bar": False, "handle_signals": False, "stop_check_period": 0}


def _trainer(device=CUDA0, amp=None, lr=0.1, callbacks=None, model=None, **options) -> Trainer:
    model = model if model is not None else make_model(hidden=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    amp_options = {"use_amp": True, "amp_dtype": amp} if amp else {}
    return Trainer(model, optimizer, nn.CrossEntropyLoss(), callbacks=callbacks, device=device, seed=3,
                   **amp_options, **OPTIONS, **options)


class StepLog(Callback):
    """At each window's end: whether the optimizer stepped, global_step, the scheduler's count and the weights."""

    def __init__(self, scheduler=None):
        self.scheduler, self.rows = scheduler, []

    def on_batch_end(self, batch_idx, trainer, logs=None):
        if logs["ends_window"]:
            self.rows.append({"stepped": logs["stepped"], "global_step": trainer.global_step,
                              "scheduler": self.scheduler.last_epoch if self.scheduler else None,
                              "params": flat_params(trainer.module)})


# ----------------------------------------------------------------------------- one process on cuda:0
@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
def test_trains_on_cuda0_in_each_precision(amp):
    trainer = _trainer(amp=amp)
    loader = DataLoader(make_dataset(256, seed=0), batch_size=16, shuffle=True)
    history = trainer.fit(loader, num_epochs=4, val_loader=DataLoader(make_dataset(64, seed=1), batch_size=32))
    assert trainer.device == torch.device(CUDA0)
    assert {p.device for p in trainer.module.parameters()} == {torch.device(CUDA0)}
    assert trainer.precision.dtype == {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert isinstance(trainer.precision, ScaledPrecision) == (amp == "fp16")
    if amp == "fp16":
        assert trainer.precision.scaler._device == trainer.device.type == "cuda"
    assert trainer.global_step == 4 * 16
    assert torch.isfinite(flat_params(trainer.module)).all()
    assert history["train_loss"][-1] < history["train_loss"][0]  # 256 samples, 64 hidden units: it fits them


def test_fp32_on_cuda_matches_the_same_run_on_cpu():
    on_gpu, on_cpu = _trainer(), _trainer(device="cpu")
    for trainer in (on_gpu, on_cpu):
        trainer.fit(DataLoader(make_dataset(128, seed=0), batch_size=16, shuffle=True), num_epochs=2)
    # The same data order (the shuffle draws from the CPU generator) and the same arithmetic up to rounding.
    torch.testing.assert_close(flat_params(on_gpu.module), flat_params(on_cpu.module), rtol=1e-4, atol=1e-5)


def test_fp16_overflow_skips_the_step_and_leaves_step_count_and_scheduler():
    model = make_model(hidden=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    log = StepLog(scheduler)
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), callbacks=[log], device=CUDA0, use_amp=True,
                      amp_dtype="fp16", scheduler=scheduler, seed=3, **OPTIONS)
    trainer.precision.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**24)  # the first steps overflow fp16
    before = flat_params(model)
    trainer.fit(DataLoader(make_dataset(256, seed=0), batch_size=8), num_epochs=1)
    stepped = [row["stepped"] for row in log.rows]
    skipped = stepped.count(False)
    assert stepped[0] is False and 1 <= skipped < len(stepped), stepped
    previous = {"global_step": 0, "scheduler": 0, "params": before}
    for row in log.rows:
        if row["stepped"]:
            assert row["global_step"] == previous["global_step"] + 1
            assert row["scheduler"] == previous["scheduler"] + 1
        else:  # skipped: nothing moved
            assert row["global_step"] == previous["global_step"]
            assert row["scheduler"] == previous["scheduler"]
            assert torch.equal(row["params"], previous["params"])
        previous = row
    assert trainer.global_step == scheduler.last_epoch == len(stepped) - skipped
    assert trainer.precision.scaler.get_scale() < 2.0**24
    assert trainer.state_dict()["scaler"]["scale"] == trainer.precision.scaler.get_scale()
    assert torch.isfinite(flat_params(model)).all()


def test_device_cuda_without_index_and_the_default_device_are_cuda0():
    assert _trainer(device="cuda").device == torch.device(CUDA0)
    assert _trainer(device=None).device == torch.device(CUDA0)


def test_pinned_non_blocking_copies_train_exactly_as_pageable_ones():
    results = []
    for pinned in (False, True):
        trainer = _trainer()
        loader = DataLoader(make_dataset(256, seed=0), batch_size=16, shuffle=True, pin_memory=pinned)
        trainer.fit(loader, num_epochs=2, val_loader=DataLoader(make_dataset(64, seed=1), batch_size=16,
                                                                 pin_memory=pinned))
        results.append((flat_params(trainer.module), trainer.history["val_loss"]))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


# ----------------------------------------------------------------------------- exact resume, CUDA RNG
def _resume_runs(tmp_path: Path, drop_cuda_rng: bool = False):
    from support.scripts.ckpt_train import EPOCHS, make_run  # the fixed run of the CPU resume tests: dropout, K=2, AdamW, StepLR

    class StopAt(Callback):
        def on_batch_end(self, batch_idx, trainer, logs=None):
            if logs["ends_window"] and trainer.global_step == 7:  # 13 steps an epoch: mid-epoch 0
                trainer.stop_training = True

    straight, loader, val = make_run([], device=CUDA0)
    straight.fit(loader, EPOCHS, val_loader=val)

    stopped, loader, val = make_run([StopAt()], device=CUDA0)
    stopped.fit(loader, EPOCHS, val_loader=val)
    assert stopped.global_step == 7 and stopped.epoch == 0 and 0 < stopped.batch_in_epoch < len(loader)
    path = stopped.save_checkpoint(tmp_path / "stop.ckpt")
    payload = torch.load(path, weights_only=True)
    assert "cuda" in payload["ranks"][0]["rng"]  # the CUDA generator's state is in the file
    if drop_cuda_rng:
        del payload["ranks"][0]["rng"]["cuda"]
        path = tmp_path / "no-cuda-rng.ckpt"
        torch.save(payload, path)

    torch.cuda.manual_seed_all(12345)  # a fresh process would start from another CUDA stream too
    resumed, loader, val = make_run([], device=CUDA0)
    resumed.fit(loader, EPOCHS, val_loader=val, resume_from=path)
    return straight, resumed


def test_mid_epoch_resume_with_dropout_on_gpu_is_bit_identical(tmp_path):
    straight, resumed = _resume_runs(tmp_path)
    assert next(straight.module.parameters()).is_cuda
    assert resumed.global_step == straight.global_step
    assert torch.equal(flat_params(resumed.module), flat_params(straight.module))
    assert resumed.history == straight.history


def test_resume_without_the_cuda_rng_state_diverges(tmp_path):
    """The control: the test above passes because the CUDA stream is restored (dropout draws on the GPU)."""
    straight, resumed = _resume_runs(tmp_path, drop_cuda_rng=True)
    assert not torch.equal(flat_params(resumed.module), flat_params(straight.module))


# ----------------------------------------------------------------------------- profiling, evaluation
def test_profiler_times_steps_with_cuda_events_and_reports_peak_memory():
    profiler = ProfilingCallback()
    trainer = _trainer(callbacks=[profiler], model=make_model(features=8, hidden=1024))
    trainer.fit(DataLoader(make_dataset(512, seed=0), batch_size=32), num_epochs=2,
                val_loader=DataLoader(make_dataset(64, seed=1), batch_size=32))
    assert type(profiler._clock).__name__ == "_CudaClock"
    [summary] = profiler.summaries
    assert summary["steps"] == trainer.global_step == 32
    assert summary["memory_kind"] == "CUDA max allocated" and summary["peak_memory"] > 0
    assert summary["peak_memory"] == torch.cuda.max_memory_allocated(trainer.device)
    assert 0 < summary["step_ms"]["p50"] <= summary["step_ms"]["p90"] <= summary["step_ms"]["max"]
    for phase in ("forward", "backward", "optimizer"):
        assert summary[f"{phase}_ms"] > 0, phase
    assert summary["forward_ms"] + summary["backward_ms"] + summary["optimizer_ms"] <= summary["step_ms"]["max"] + 1e-3
    assert summary["samples"] == 512 * 2 and summary["samples_per_s"] > 0
    assert "CUDA max allocated" in profiler.table or "peak" in profiler.table.lower()


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_evaluate_and_predict_on_gpu_match_the_module_run_by_hand(amp):
    trainer = _trainer(amp=amp)
    trainer.fit(DataLoader(make_dataset(128, seed=0), batch_size=16), num_epochs=1)
    val = make_dataset(50, seed=1)  # 50: the last batch is short
    loader = DataLoader(val, batch_size=16, pin_memory=True)
    metrics = trainer.evaluate(loader)
    predictions = trainer.predict(loader)
    assert predictions.device.type == "cpu" and predictions.shape == (50, 3)
    x, y = (t.to(CUDA0) for t in val.tensors)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp == "bf16"):
        logits = trainer.module.eval()(x)
        loss = nn.functional.cross_entropy(logits, y)
    torch.testing.assert_close(predictions, logits.cpu())
    assert metrics["val_accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    tolerance = 1e-5 if amp is None else 2e-2
    assert metrics["val_loss"] == pytest.approx(loss.item(), rel=tolerance, abs=tolerance)


# ----------------------------------------------------------------------------- real processes
def _run_ranks(tmp_path: Path, name: str, nproc: int, *args: str, env: dict | None = None) -> list[dict]:
    out = tmp_path / name
    out.mkdir()
    torchrun(RANKS, "--out", str(out), *args, nproc=nproc, timeout=180, env=env)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def _check_ranks(results: list[dict], reference: list[dict] | None) -> None:
    first = results[0]
    for r in results:
        assert torch.equal(r["params"], first["params"])  # DDP kept the ranks in sync
        assert torch.equal(r["loaded_params"], r["params"]) and r["loaded_step"] == r["global_step"]
        assert r["predictions"].shape == (40, 3)
        assert torch.equal(r["predictions"], first["predictions"])
        assert r["evaluation"]["val_accuracy"] == pytest.approx(
            (r["predictions"].argmax(1) == r["targets"]).float().mean().item())
        assert r["evaluation"] == first["evaluation"]
    if reference is not None:  # the same run on CPU with gloo: equal up to rounding
        torch.testing.assert_close(first["params"], reference[0]["params"], rtol=1e-4, atol=1e-5)
        assert first["global_step"] == reference[0]["global_step"]


@pytest.fixture(scope="module")
def cpu_references(tmp_path_factory):
    """ranks.py on CPU (gloo) with 1 and 2 ranks: what the GPU runs must reproduce."""
    tmp = tmp_path_factory.mktemp("cpu_ref")
    env = child_env(CUDA_VISIBLE_DEVICES="")
    return {1: _run_ranks(tmp, "one", 1, "--device", "cpu", "--own-group", "gloo", env=env),
            2: _run_ranks(tmp, "two", 2, "--device", "cpu", env=env)}


def test_one_rank_nccl_group_under_torchrun(tmp_path, cpu_references):
    [result] = _run_ranks(tmp_path, "nccl1", 1, "--own-group", "nccl", "--device", "cuda")
    assert result["backend"] == "nccl" and result["world_size"] == 1
    assert torch.equal(result["own_group"]["all_reduce"], torch.ones(4))
    assert result["own_group"]["gathered"] == [{"rank": 0}]
    assert result["device"] == CUDA0 and result["param_devices"] == [CUDA0] and not result["ddp"]
    _check_ranks([result], cpu_references[1])


def test_two_ranks_share_one_gpu_through_gloo(tmp_path, cpu_references):
    """NCCL refuses two ranks on one device; gloo all-reduces the CUDA gradients of DDP instead."""
    env = child_env(CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
    results = _run_ranks(tmp_path, "gloo2", 2, "--device", "cuda", "--backend", "gloo", env=env)
    for r in results:
        assert r["backend"] == "gloo" and r["world_size"] == 2 and r["ddp"]
        assert r["device"] == CUDA0 and r["param_devices"] == [CUDA0]
    _check_ranks(results, cpu_references[2])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: NCCL refuses two ranks on one device")
def test_two_ranks_on_two_gpus_with_nccl(tmp_path, cpu_references):
    results = _run_ranks(tmp_path, "nccl2", 2)  # no device, no backend: cuda:LOCAL_RANK and NCCL by default
    assert [r["device"] for r in results] == ["cuda:0", "cuda:1"]
    for r in results:
        assert r["backend"] == "nccl" and r["world_size"] == 2 and r["ddp"]
    _check_ranks(results, cpu_references[2])


def test_two_ranks_on_one_gpu_with_bf16_through_gloo(tmp_path):
    results = _run_ranks(tmp_path, "gloo2bf16", 2, "--device", "cuda:0", "--backend", "gloo", "--amp", "bf16",
                         env=child_env(CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]))
    assert all(r["amp_dtype"] == "torch.bfloat16" for r in results)
    _check_ranks(results, None)


# ----------------------------------------------------------------------------- compile, asynchronous saves
def test_compile_on_gpu_matches_eager():
    eager, compiled = _trainer(), _trainer(compile=True)
    for trainer in (eager, compiled):
        trainer.fit(DataLoader(make_dataset(256, seed=0), batch_size=16, shuffle=True), num_epochs=2)
    assert not torch.equal(flat_params(eager.module), flat_params(make_model(hidden=64)))  # it trained
    torch.testing.assert_close(flat_params(compiled.module), flat_params(eager.module), rtol=1e-3, atol=1e-4)


def test_fsdp_asynchronous_checkpoint_staging(tmp_path):
    """strategy="fsdp" with async_checkpoint=True on cuda:0, in one process (nothing to shard: the DCP
    folders hold whole tensors): each save stages the state out of GPU memory before training goes on,
    so the checkpoint of step 8, written in the background while steps 9-14 ran, holds step 8's weights,
    and a run resumed from it ends on the uninterrupted run's weights, bit for bit (its dropout draws
    from the restored CUDA stream)."""
    folder = tmp_path / "ckpt"
    straight = dcp_trainer(True, device=CUDA0)
    straight.fit(dcp_loader(), max_steps=14)
    at_8 = WeightsAt(8)
    saving = dcp_trainer(True, [ModelCheckpoint(folder, every_n_steps=4, every_n_epochs=None), at_8], device=CUDA0)
    saving.fit(dcp_loader(), max_steps=14)
    saving.close()  # waits for the save in flight
    assert next(saving.module.parameters()).is_cuda
    final = straight.module.state_dict()
    assert any(not torch.equal(at_8.weights[name], final[name]) for name in final)  # later steps moved them
    loaded = dcp_trainer(True, device=CUDA0)
    loaded.load_checkpoint(folder / "step-000000008.ckpt")
    assert loaded.global_step == 8
    for name, value in loaded.module.state_dict().items():
        assert torch.equal(value, at_8.weights[name]), name
    resumed = dcp_trainer(True, device=CUDA0)
    resumed.fit(dcp_loader(), max_steps=14, resume_from=folder / "step-000000008.ckpt")
    assert resumed.global_step == 14
    for name, value in resumed.module.state_dict().items():
        assert torch.equal(value, final[name]), name
