"""Activation checkpointing under DDP and FSDP on 2 ranks: gradients unchanged, blocks recomputed."""
from __future__ import annotations

from support import run_spawn
from support.activation_checkpointing import same as _same, train as _train


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
