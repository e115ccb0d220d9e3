"""FSDP CPU offload (``fsdp_kwargs={"offload_policy": CPUOffloadPolicy(...)}``): on 2 CPU ranks FSDP2 runs its
offload path (sharded parameters, gradients and the optimizer step kept on the host, copied for each
all-gather) and trains to the weights of the run without it; ``pin_memory=True`` (the policy's default) needs
an accelerator, and without one it is an error at construction naming the fix. The pinned path on a GPU,
the one that saves GPU memory, belongs to the GPU script (docs/parallelism.md)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy

from anndist import Trainer
from support import run_spawn, tp


def _train(rank: int, world_size: int) -> dict:
    out = {}
    for name, kwargs in (("plain", {}), ("offload", {"offload_policy": CPUOffloadPolicy(pin_memory=False)})):
        module = tp.model("deep")
        trainer = Trainer(module, torch.optim.AdamW(module.parameters(), lr=1e-2), nn.CrossEntropyLoss(), seed=0,
                          strategy="fsdp", fsdp_kwargs=kwargs, shard_modules=lambda m: isinstance(m, tp.Block),
                          gradient_accumulation_steps=2, max_grad_norm=1.0, progress_bar=False, handle_signals=False)
        x, y = tp.data()
        trainer.fit(tp.rank_batches(tp.global_batches(x, y, 0, 8), rank, world_size), num_epochs=1)
        state = trainer.state_dict()  # gathered to rank 0
        policy = trainer.module._get_fsdp_state()._fsdp_param_group.offload_policy  # what FSDP2 runs with
        out[name] = {"model": state["model"], "steps": trainer.global_step, "policy": type(policy).__name__}
    return out


def test_offloaded_fsdp_trains_to_the_same_weights():
    results = run_spawn(_train, 2, timeout=240)
    main = results[0]
    assert main["offload"]["policy"] == "CPUOffloadPolicy" and main["plain"]["policy"] == "OffloadPolicy"
    assert main["plain"]["steps"] == main["offload"]["steps"] == 4
    assert tp.max_diff(main["plain"]["model"], main["offload"]["model"]) < 1e-6


def test_pinned_offload_without_an_accelerator_is_an_error_naming_the_fix():
    module = tp.model()

    def build():
        return Trainer(module, torch.optim.SGD(module.parameters(), lr=0.1), nn.CrossEntropyLoss(), strategy="fsdp",
                       fsdp_kwargs={"offload_policy": CPUOffloadPolicy()}, progress_bar=False, handle_signals=False)

    if torch.accelerator.is_available():
        build()  # pinned host memory is what an accelerator's offload wants
    else:
        with pytest.raises(ValueError, match=r"CPUOffloadPolicy\(pin_memory=False\)"):
            build()
