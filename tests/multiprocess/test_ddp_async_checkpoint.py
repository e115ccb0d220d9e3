"""Asynchronous checkpoints under strategy="ddp": DCP folders, as under FSDP (checkpoint/sharded.py).

On 2 ranks: a run saved asynchronously mid-run (training going on during the write) and resumed is
bit-identical to an uninterrupted one; the replicated state is written once, spread over both ranks;
a synchronous DDP run and an FSDP run load such a folder. In one process (the same saves, resume and
consolidation): tests/unit/test_ddp_async_checkpoint.py; kill -9: tests/e2e/test_ddp_async_checkpoint.py.
"""
from __future__ import annotations

import pytest
import torch

from anndist.checkpoint.file import read_checkpoint
from support import full_weights, run_spawn
from support.dcp_runs import dcp_trainer, stop_and_resume


def _ddp_scenarios(rank: int, world_size: int, folder: str) -> dict:
    out = stop_and_resume(rank, world_size, folder, True, "ddp")
    saved = f"{folder}/step-000000008.ckpt"
    for strategy in ("ddp", "fsdp"):  # a synchronous DDP run (it saves files) and FSDP read the folder too
        reader = dcp_trainer(False, strategy=strategy)
        reader.load_checkpoint(saved)
        out[f"{strategy}_loaded"] = (reader.global_step, full_weights(reader.module))
        reader.close()
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp_async")
    return folder, run_spawn(_ddp_scenarios, 2, str(folder))


def test_async_save_mid_run_resumes_bit_identical_on_two_ranks(two_ranks):
    folder, ranks = two_ranks
    for out in ranks:
        for name, value in out["straight"].items():
            assert torch.equal(out["resumed"][name], value), name
            assert torch.equal(out["from_step_8"][name], value), name  # saved while training went on
        assert out["history"][0]["train_loss"] == out["history"][1]["train_loss"]
        assert out["blocked"] >= 0
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-000000004.ckpt", "step-000000008.ckpt",
                                                         "stop.ckpt"]
    assert (folder / "latest").read_text().strip() == "stop.ckpt"


def test_the_replicated_state_is_written_once_spread_over_the_ranks(two_ranks):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    folder, _ = two_ranks
    stop = folder / "stop.ckpt"
    assert sorted(p.name for p in stop.iterdir()) == [".metadata", ".metadata.crc32", "__0_0.distcp", "__1_0.distcp", "run.ckpt"]
    metadata = FileSystemReader(stop).read_metadata()
    fqns = [index.fqn for index in metadata.storage_data]
    assert len(fqns) == len(set(fqns))  # every tensor once, not once per rank
    elements = {"__0_0.distcp": 0, "__1_0.distcp": 0}
    for index, where in metadata.storage_data.items():
        entry = metadata.state_dict_metadata[index.fqn]
        if isinstance(entry, TensorStorageMetadata):
            elements[where.relative_path] += entry.size.numel()
    total = sum(elements.values())
    assert total == 3 * sum(p.numel() for p in dcp_trainer(False, strategy="ddp").module.parameters()) + 4  # + steps
    assert min(elements.values()) > 0.2 * total  # each rank wrote a good part of it
    payload = read_checkpoint(stop / "run.ckpt")
    assert "model" not in payload["states"] and "optimizer" not in payload["states"]


def test_synchronous_ddp_and_fsdp_runs_load_the_folder(two_ranks):
    _, ranks = two_ranks
    for out in ranks:
        for strategy in ("ddp", "fsdp"):
            step, weights = out[f"{strategy}_loaded"]
            assert step == 8
            assert weights.keys() == out["straight"].keys()
        ddp, fsdp = out["ddp_loaded"][1], out["fsdp_loaded"][1]
        assert all(torch.equal(ddp[name], fsdp[name]) for name in ddp)
