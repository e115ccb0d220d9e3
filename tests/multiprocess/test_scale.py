"""Per-rank costs that do not grow with the number of ranks (issue 31), counted on 2 and 8 gloo ranks
(one spawn each, every scenario in it; ``support/counting.py`` counts from outside the library).

- a resume reads the checkpoint once in all (rank 0, checking it as it reads) and the other ranks
  receive what they restore: all ranks together read at most twice the file, at any number of ranks
  (a single file and a replicated DCP folder); and it is exact;
- a save brings a rank other than the writer the same bytes at 8 ranks as at 2 (its own state goes to
  the writer alone), and costs each rank the same store operations;
- after several saves the store holds no key more than before them;
- the watchdog's and the timeout's diagnoses cost each rank but the judging one the same few store
  operations at 8 ranks as at 2, and name the rank that is behind;
- the group of asynchronous saves is made once, when the Trainer is built;
- a tree of tensors broadcast from rank 0 (how a resume's states reach the ranks) arrives whole, with
  its kinds of dicts, dtypes and shapes, and brings each rank its bytes once, through a staging buffer
  too (the way NCCL jobs carry them).
"""
from __future__ import annotations

from datetime import timedelta
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from anndist import Trainer
from anndist.callbacks.watchdog import Watchdog
from anndist.dist import arrival, state_broadcast, timeouts
from support import flat_params, make_dataset, run_spawn
from support.counting import Counts, CountingStore, Meter

SIZES = (2, 8)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 3))


def _trainer(folder: Path | None = None, **options) -> Trainer:
    model = _model()
    return Trainer(model, torch.optim.AdamW(model.parameters(), lr=0.01), nn.CrossEntropyLoss(), seed=0,
                   checkpoint_dir=folder, progress_bar=False, handle_signals=False, **options)


def _loader() -> DataLoader:
    return DataLoader(make_dataset(64), batch_size=4, shuffle=True)  # 16 samples per rank at 4 ranks


def _groups() -> int:
    return len(dist.distributed_c10d._world.pg_map)


def _scenarios(rank: int, world_size: int, root: str) -> dict:
    root = Path(root)
    store = CountingStore(arrival.default_store())  # the library's own store operations, counted
    arrival.default_store = lambda: store
    meter = Meter(None, root).install()
    out: dict = {}

    trainer = _trainer(root / "file")
    trainer.fit(_loader(), num_epochs=1)
    dist.barrier()  # no rank is in a save yet
    keys_before, saves = store.num_keys(), []
    dist.barrier()  # every rank has counted
    for _ in range(3):
        counts, ops = Counts(), sum(store.ops.values())
        with meter.measure(counts):
            out["file"] = trainer.save_in_dir(root / "file")
        saves.append({**counts.as_dict(), "store_ops": sum(store.ops.values()) - ops})
    dist.barrier()  # every rank is through every save
    out.update(saves=saves, keys=(keys_before, store.num_keys()), weights=flat_params(trainer.module))

    _trainer(root / "file").fit(_loader(), num_epochs=1, resume_from=root / "file")  # imports done once
    resumed = _trainer(root / "file")
    with meter.measure(Counts()) as counts:
        resumed.fit(_loader(), num_epochs=1, resume_from=root / "file")
    out.update(resume=counts.as_dict(), resumed_weights=flat_params(resumed.module))

    groups_before = _groups()
    writer = _trainer(root / "folder", async_checkpoint=True)
    groups_built = _groups()
    writer.fit(_loader(), num_epochs=1)
    writer.save_in_dir(root / "folder")
    out["folder"] = writer.save_in_dir(root / "folder")
    writer.checkpoints.wait()
    out.update(groups=(groups_before, groups_built, _groups()), folder_weights=flat_params(writer.module))
    _trainer(root / "folder", async_checkpoint=True).fit(_loader(), num_epochs=1, resume_from=root / "folder")
    reader = _trainer(root / "folder", async_checkpoint=True)
    with meter.measure(Counts()) as counts:
        reader.fit(_loader(), num_epochs=1, resume_from=root / "folder")
    out.update(folder_resume=counts.as_dict(), folder_resumed_weights=flat_params(reader.module))

    out["tree"] = _tree(meter, rank)
    out["watchdog"] = _watchdog(store, rank, world_size)
    out["timeout"] = _timeout(store, rank, world_size)
    for done in (trainer, resumed, writer, reader):
        done.close()
    return out


def _a_tree() -> dict:
    torch.manual_seed(1)
    weights = OrderedDict(big=torch.randn(300, 1000), half=torch.randn(7, 3).to(torch.bfloat16))
    weights._metadata = {"": {"version": 2}}
    return {"model": weights, "mask": torch.tensor([True, False]), "step": torch.tensor(5), "empty": torch.empty(0, 4),
            "view": torch.arange(12.0).reshape(3, 4).t(), "groups": [{"lr": 0.1, "params": (0, 1)}], "note": "x"}


def _tree(meter: Meter, rank: int) -> dict:
    state_broadcast.STAGING = 1 << 16  # 64 kB pieces: the large tensor goes in several
    out = {}
    for staging in (None, torch.device("cpu")):
        with meter.measure(Counts()) as counts:
            tree = state_broadcast.broadcast_tree(_a_tree() if rank == 0 else None, staging=staging)
        out[str(staging)] = {"tree": tree, "received": counts.received}
    return out


def _watchdog(store: CountingStore, rank: int, world_size: int) -> dict:
    """Every rank's watchdog fires; rank 1 made one hook call fewer than the others."""
    dog = Watchdog(timeout=2.0)
    dog.rank, dog.world_size, dog.store, dog.count = rank, world_size, store, 10 - (rank == 1)
    before = sum(store.ops.values())
    behind, counts = dog._behind()
    return {"behind": behind, "counts": counts, "ops": sum(store.ops.values()) - before}


def _timeout(store: CountingStore, rank: int, world_size: int) -> dict:
    """Every rank but the last saw a collective time out; the last never came."""
    dist.barrier()
    if rank == world_size - 1:
        return {"ops": 0, "error": None}
    before = sum(store.ops.values())
    error = timeouts.never_arrived(RuntimeError("gloo: timed out"), timedelta(seconds=3))
    return {"ops": sum(store.ops.values()) - before, "error": str(error)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {n: run_spawn(_scenarios, n, str(tmp_path_factory.mktemp(f"ranks{n}")), timeout=280) for n in SIZES}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())


@pytest.mark.parametrize("n", SIZES)
def test_a_resume_reads_the_checkpoint_once_in_all_and_is_exact(runs, n):
    ranks = runs[n]
    single, dcp = _size(ranks[0]["file"]), _size(ranks[0]["folder"])
    read = sum(r["resume"]["read"] for r in ranks)
    assert single > 1_000_000 and read <= 2 * single, (read, single, [r["resume"]["read"] for r in ranks])
    folder_read = sum(r["folder_resume"]["read"] for r in ranks)
    assert folder_read <= 2 * dcp, (folder_read, dcp, [r["folder_resume"]["read"] for r in ranks])
    for r in ranks:
        assert torch.equal(r["resumed_weights"], r["weights"])
        assert torch.equal(r["folder_resumed_weights"], r["folder_weights"])


def test_a_save_brings_a_non_writer_the_same_bytes_and_store_operations_at_8_ranks_as_at_2(runs):
    received = {n: [[save["received"] for save in r["saves"]] for r in runs[n]] for n in SIZES}
    ops = {n: [save["store_ops"] for r in runs[n] for save in r["saves"]] for n in SIZES}
    assert len({x for r in received[8][1:] + received[2][1:] for x in r}) == 1, received  # one figure for all
    assert received[8][1][0] <= 64, received  # a few numbers agreed on: no other rank's state
    assert max(ops[8]) == max(ops[2]) <= 10, ops  # the last to leave a save deletes its keys: 5 more
@pytest.mark.parametrize("n", SIZES)
def test_the_store_keeps_no_key_of_a_finished_save(runs, n):
    for r in runs[n]:
        before, after = r["keys"]
        assert after == before, r["keys"]


def test_the_watchdog_and_timeout_verdicts_cost_each_rank_the_same_at_8_ranks_as_at_2(runs):
    for what in ("watchdog", "timeout"):
        # The first to arrive judges and publishes; each rank's operations are a fixed few, the judge's too.
        ops = {n: [r[what]["ops"] for r in runs[n][:n - (what == "timeout")]] for n in SIZES}
        assert max(ops[8]) == max(ops[2]) <= 10, (what, ops)
    for n in SIZES:
        others = "rank 0" if n == 2 else f"ranks 0, 2-{n - 1}"
        for r in runs[n]:
            assert r["watchdog"]["behind"] == [1], r["watchdog"]
            assert r["watchdog"]["counts"] == f"rank 1 at 9, {others} at 10"
        for r in runs[n][:-1]:
            assert f"rank(s) [{n - 1}] never arrived" in r["timeout"]["error"], r["timeout"]


@pytest.mark.parametrize("n", SIZES)
def test_the_group_of_asynchronous_saves_is_made_once_when_the_trainer_is_built(runs, n):
    for r in runs[n]:
        before, built, after = r["groups"]
        assert built == before + 1 and after == built, r["groups"]


@pytest.mark.parametrize("n", SIZES)
def test_a_broadcast_tree_arrives_whole_and_brings_each_rank_its_bytes_once(runs, n):
    expected = _a_tree()
    nbytes = sum(t.numel() * t.element_size() for t in (expected["model"]["big"], expected["model"]["half"],
                                                         expected["mask"], expected["step"], expected["view"]))
    for r in runs[n]:
        for how, got in r["tree"].items():
            tree = got["tree"]
            assert type(tree["model"]) is OrderedDict and tree["model"]._metadata == {"": {"version": 2}}
            for key in ("mask", "step", "empty", "view"):
                assert tree[key].dtype == expected[key].dtype and torch.equal(tree[key], expected[key]), (how, key)
            for key in ("big", "half"):
                assert torch.equal(tree["model"][key], expected["model"][key]), (how, key)
            assert tree["groups"] == [{"lr": 0.1, "params": (0, 1)}] and tree["note"] == "x"
    for r in runs[n][1:]:  # the structure (pickled, a few hundred bytes) and the tensors' bytes, once
        assert all(nbytes <= got["received"] <= nbytes + 4096 for got in r["tree"].values()), (nbytes, r["tree"])
