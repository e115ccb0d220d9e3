"""Logged values on two real gloo ranks (one spawn): the logged loss is the mean over the interval and
over all ranks, the reduction runs on logging steps only, metrics.jsonl and TensorBoard continue
after a resume in a new Trainer, and the profiling table names a rank whose data loading lags."""
import json
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from anndist import Callback, LoggingCallback, ProfilingCallback, TensorBoardCallback, Trainer
from anndist.dist import collectives
from support import make_dataset, make_model, run_spawn

INTERVAL = 2
SLOW_RANK_DELAY_S = 0.002  # per sample on rank 1: ~8 ms of extra data wait per micro-batch


class MicroBatches(Callback):
    """What each micro-batch contributed on this rank (test-side only: .item() syncs)."""

    def __init__(self):
        self.seen = []

    def on_batch_end(self, batch_idx, trainer, logs=None):
        self.seen.append({"epoch": trainer.epoch, "step": trainer.global_step, "loss": logs["loss"].item(),
                          "n": logs["batch_size"], "stepped": logs["stepped"]})


class SlowOnRank(Dataset):
    def __init__(self, data, rank, slow_rank):
        self.data, self.delay = data, SLOW_RANK_DELAY_S if rank == slow_rank else 0.0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)  # a slow disk on one node
        return self.data[i]


def _spy_reductions(logging_cb, trainer):
    """Record the optimizer step of every collective started inside LoggingCallback.on_batch_end."""
    steps, inside, original_hook = [], [False], logging_cb.on_batch_end
    originals = {name: getattr(collectives, name) for name in ("all_reduce", "all_reduce_async", "all_gather_object",
                                                                  "broadcast_object", "barrier")}

    def hook(batch_idx, trainer_, logs=None):
        inside[0] = True
        try:
            original_hook(batch_idx, trainer_, logs)
        finally:
            inside[0] = False

    def spy(name):
        def collective(*args, **kwargs):
            if inside[0]:
                steps.append((name, trainer.global_step))
            return originals[name](*args, **kwargs)
        return collective

    logging_cb.on_batch_end = hook
    for name in originals:
        setattr(collectives, name, spy(name))
    return steps


def _trainer(callbacks):
    model = make_model()
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                   callbacks=callbacks, gradient_accumulation_steps=2, seed=3)


def _run(rank, world_size, run_dir):
    # 44 samples: 22 per rank in micro-batches of 4,4,4,4,4,2; windows of 2 -> 3 steps per epoch.
    loader = DataLoader(SlowOnRank(make_dataset(44), rank, slow_rank=1), batch_size=4, shuffle=True)
    seen, logging_cb, profiling = MicroBatches(), LoggingCallback(INTERVAL, run_dir), ProfilingCallback()
    trainer = _trainer([seen, logging_cb, TensorBoardCallback(f"{run_dir}/tb", INTERVAL), profiling])
    reduced = _spy_reductions(logging_cb, trainer)
    trainer.fit(loader, num_epochs=2)
    state = trainer.state_dict()
    whole = {k: torch.equal(v, state["model"].get(k, torch.empty(0))) for k, v in trainer.module.state_dict().items()}
    # The resumed run: a new Trainer and new callbacks on the same folder, from the saved state.
    seen2, logging_cb2 = MicroBatches(), LoggingCallback(INTERVAL, run_dir)
    resumed = _trainer([seen2, logging_cb2, TensorBoardCallback(f"{run_dir}/tb", INTERVAL)])
    resumed.load_state_dict(state)
    reduced2 = _spy_reductions(logging_cb2, resumed)
    resumed.fit(loader, num_epochs=3)
    return {"seen": seen.seen + seen2.seen, "reduced": (reduced, reduced2), "whole_model": whole,
            "summaries": profiling.summaries, "table": profiling.table}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    results = run_spawn(_run, 2, str(run_dir))
    return results, run_dir


def _expected_intervals(per_rank):
    """{logging step: (global mean loss, rank 0's own mean)} over each interval's micro-batches."""
    expected, sums = {}, None
    for batches in zip(*per_rank):  # ranks take the same micro-batches in lockstep
        epoch, step = batches[0]["epoch"], batches[0]["step"]
        if sums is None or epoch != sums["epoch"]:
            sums = {"epoch": epoch, "all": [0.0, 0], "rank0": [0.0, 0]}  # intervals restart each epoch
        for rank, b in enumerate(batches):
            for key in ("all", "rank0") if rank == 0 else ("all",):
                sums[key][0] += b["loss"] * b["n"]
                sums[key][1] += b["n"]
        if batches[0]["stepped"] and step % INTERVAL == 0:
            expected[step] = (sums["all"][0] / sums["all"][1], sums["rank0"][0] / sums["rank0"][1])
            sums = None
    return expected


def test_logged_loss_is_the_mean_over_the_interval_and_all_ranks(run):
    results, run_dir = run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["loss"] for r in records if r["kind"] == "step"}
    expected = _expected_intervals([r["seen"] for r in results])
    assert sorted(logged) == sorted(expected) == [2, 4, 6, 8]
    for step, (global_mean, _) in expected.items():
        assert logged[step] == pytest.approx(global_mean, rel=1e-9), step
    # The check has teeth: rank 0's own mean is a different number.
    assert any(abs(rank0 - global_mean) > 1e-4 for global_mean, rank0 in expected.values())


def test_reduction_happens_on_logging_steps_only(run):
    results, _ = run
    for result in results:  # every rank takes part, at the same steps
        assert result["reduced"] == ([("all_reduce_async", 2), ("all_reduce_async", 4), ("all_reduce_async", 6)],
                                     [("all_reduce_async", 8)])


def test_metrics_file_is_valid_and_continues_after_a_resume(run):
    _, run_dir = run
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in lines]
    assert [(r["kind"], r["epoch"], r["step"]) for r in records] == [
        ("start", 0, 0), ("step", 0, 2), ("epoch", 0, 3), ("step", 1, 4), ("step", 1, 6), ("epoch", 1, 6),
        ("start", 2, 6), ("step", 2, 8), ("epoch", 2, 9)]
    assert all(r["world_size"] == 2 for r in records if r["kind"] == "start")
    for r in records:
        if r["kind"] == "step":
            assert r["lr"] == 0.1 and r["samples_per_s"] > 0
        if r["kind"] == "epoch":
            assert set(r) >= {"train_loss", "epoch_time"} and r["train_loss"] > 0
    assert [r["time"] for r in records] == sorted(r["time"] for r in records)


def test_tensorboard_scalars_match_the_metrics_file(run):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    _, run_dir = run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = EventMultiplexer().AddRunsFromDirectory(str(run_dir / "tb")).Reload()
    scalars = {}
    for run_name in events.Runs():
        for tag in events.GetAccumulator(run_name).Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(run_name, tag))
    logged = [(r["step"], r["loss"]) for r in records if r["kind"] == "step"]
    written = sorted(scalars["train/loss"])
    assert [step for step, _ in written] == [step for step, _ in logged]
    assert [value for _, value in written] == pytest.approx([loss for _, loss in logged], rel=1e-6)
    assert sorted(s for s, _ in scalars["epoch/train_loss"]) == [3, 6, 9]
    assert {"train/lr", "train/samples_per_s", "epoch/epoch_time"} <= set(scalars)


def test_profiling_table_has_every_rank_and_names_the_straggler(run):
    results, _ = run
    table = results[0]["table"]
    assert results[0]["summaries"] == results[1]["summaries"]  # gathered on every rank
    assert [s["rank"] for s in results[0]["summaries"]] == [0, 1]
    rows = [line.split() for line in table.splitlines() if line.split() and line.split()[0] in ("0", "1")]
    assert [row[0] for row in rows] == ["0", "1"]
    for s in results[0]["summaries"]:
        assert s["steps"] == 6 and s["samples"] == 44  # 2 epochs x 22 samples, all steps timed
        assert s["step_ms"]["p50"] <= s["step_ms"]["p90"] <= s["step_ms"]["max"]
        assert s["peak_memory"] > 0
    slow, fast = results[0]["summaries"][1], results[0]["summaries"][0]
    assert slow["data_ms"] > fast["data_ms"] + 4  # 4 samples x 2 ms per micro-batch, 2 per step
    assert "straggler: rank 1 " in table, table


def test_ddp_state_dict_holds_the_whole_model_on_every_rank(run):
    # Under DDP every rank holds the model: Trainer.state_dict() gives it whole on each (only FSDP gathers to rank 0).
    results, _ = run
    for result in results:
        assert result["whole_model"] and all(result["whole_model"].values()), result["whole_model"]
