"""Tensor-parallel runs on real ranks, for tests/test_tensor_parallel*.py; launched under torchrun.

    torchrun --standalone --nproc_per_node=4 tests/support/scripts/tp_runs.py --out DIR --runs held_out,ddp_tp,...

Each run trains small models through the Trainer on a (dp x tp) grid and returns what the tests
compare with one process trained on the same global batches (tests/tp_support.py). Every rank writes
``DIR/rank{r}.pt``: ``{run: result}``; a run that raises ends the launch (torchrun names the rank).
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "launch"), str(ROOT)]
from support import tp  # noqa: E402
from support.tp import QUIET, trainer  # noqa: E402
import train_gpt2  # noqa: E402

from anndist import Callback, Trainer  # noqa: E402
from anndist.strategies.dtensor import local  # noqa: E402

OUT: Path = Path(".")


def full_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model on every rank (gathered from its DTensor parts)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in state.items()}


def my_batches(t: Trainer, first: int, count: int, n: int = 128) -> list:
    x, y = tp.data(n)
    return tp.rank_batches(tp.global_batches(x, y, first, count), t.strategy.data_rank, t.strategy.data_world_size)


class Norms(Callback):
    def __init__(self) -> None:
        self.norms = []

    def on_batch_end(self, batch_idx, trainer=None, logs=None):
        if logs["stepped"]:
            self.norms.append(trainer.last_grad_norm)


class FirstGrads(Callback):
    """Each parameter's local gradient at the end of the first window's backward (reduced, before the step)."""

    def __init__(self) -> None:
        self.grads = None

    def on_backward_end(self, batch_idx, trainer=None, logs=None):
        if logs["ends_window"] and self.grads is None:
            self.grads = [local(p.grad).detach().clone() for p in trainer.module.parameters()]


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_batch_end(self, batch_idx, trainer=None, logs=None):
        if trainer.global_step >= self.step:
            trainer.stop_training = True


REDUCTIONS: list = []


def count_reductions() -> list:
    """FSDP2's gradient reductions (``foreach_reduce``: fully_shard's reduce-scatter, replicate's all-reduce),
    counted from now on (the counter is installed once per process)."""
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group
    if not getattr(param_group.foreach_reduce, "counted", False):
        reduce = param_group.foreach_reduce

        def counted(*args, **kwargs):
            REDUCTIONS.append(1)
            return reduce(*args, **kwargs)
        counted.counted = True
        param_group.foreach_reduce = counted
    REDUCTIONS.clear()
    return REDUCTIONS


# ---------------------------------------------------------------------------------------------- runs
def held_out() -> dict:
    """The issue's check: 2-D (fsdp, tp 2), K=2, per-rank loaders, 4 steps; then its checkpoint in a
    4-rank DDP Trainer, 2 more steps."""
    t = trainer(tp.model(), strategy="fsdp", tp_size=2, tp_plan=tp.PLAN, gradient_accumulation_steps=2)
    t.fit(my_batches(t, 0, 8), num_epochs=1)
    out = {"four": full_weights(t.module), "steps": t.global_step, "layout": t.strategy.grid.describe(),
           "history": t.history, "types": sorted({type(p).__name__ for p in t.module.parameters()})}
    t.save_in_dir(OUT / "held_out", "four")
    ddp = trainer(tp.model(seed=1), gradient_accumulation_steps=2)  # other weights: the checkpoint's must win
    ddp.fit(my_batches(ddp, 8, 4), num_epochs=2, resume_from=OUT / "held_out" / "four.ckpt")
    out.update(six=full_weights(ddp.module), ddp_steps=ddp.global_step, ddp_data=ddp.strategy.data_world_size)
    return out


def with_loader(strategy: str) -> dict:
    """A DataLoader anndist shards over the data-parallel ranks, clipping, evaluation, metrics, predict."""
    import torchmetrics

    class Count:  # gathered: sees every sample once
        def reset(self):
            self.n = 0

        def update(self, preds, targets):
            self.n += len(targets)

        def compute(self):
            return self.n

    class SyncedCount(torchmetrics.Metric):  # syncs itself (over the data-parallel group)
        def __init__(self):
            super().__init__()
            self.add_state("n", default=torch.tensor(0), dist_reduce_fx="sum")

        def update(self, preds, targets):
            self.n += len(targets)

        def compute(self):
            return self.n

    x, y = tp.data()
    norms = Norms()
    t = trainer(tp.model(), strategy=strategy, tp_size=2, tp_plan=tp.PLAN, gradient_accumulation_steps=2,
                max_grad_norm=0.3, callbacks=[norms], metrics={"count": Count(), "synced": SyncedCount()})
    reductions = count_reductions()
    t.fit(DataLoader(TensorDataset(x, y), batch_size=tp.MICRO // t.strategy.data_world_size), num_epochs=1)
    rounds = len(reductions) / t.global_step  # once per window (K=2), not per micro-batch
    vx, vy = tp.data(37, seed=1)
    val = DataLoader(TensorDataset(vx, vy), batch_size=5)
    return {"weights": full_weights(t.module), "norms": norms.norms, "history": t.history, "rounds": rounds,
            "eval": t.evaluate(val), "predict": t.predict(val), "predict_main": t.predict(val, main_process_only=True)}


def global_batch() -> dict:
    """``global_batch_size`` on a (dp=2, tp=2) grid: the sampler cuts the global order over the
    data-parallel ranks, so both ranks of a tensor-parallel group read the same micro-batches."""
    t = trainer(tp.model(), strategy="ddp", tp_size=2, tp_plan=tp.PLAN, global_batch_size=tp.GLOBAL_BATCH)
    t.fit(tp.global_batch_loader(), num_epochs=2)
    return {"weights": full_weights(t.module), "k": t.state.accumulation_steps, "history": t.history,
            "steps": t.global_step}


def activation_checkpointing() -> dict:
    """Dropout inside TP blocks: gradients and weights with activation checkpointing (and compiled) equal
    those without, under 2-D FSDP and TP+replicas."""
    out = {}
    for strategy in ("fsdp", "ddp"):
        for name, options in (("plain", {}), ("ac", {"activation_checkpointing": True}),
                              ("compiled", {"compile": {"backend": "eager"}}),
                              ("ac_compiled", {"activation_checkpointing": True, "compile": {"backend": "eager"}})):
            grads = FirstGrads()
            t = trainer(tp.model("deep"), "sgd", strategy=strategy, tp_size=2, tp_plan=tp.BLOCK_PLAN,
                        gradient_accumulation_steps=2, callbacks=[grads], **options)
            t.fit(my_batches(t, 0, 6), num_epochs=1)
            out[(strategy, name)] = {"grads": grads.grads, "weights": full_weights(t.module),
                                     "keys": sorted(t.module.state_dict())}
    return out


def items() -> dict:
    """compute_loss returning (loss, num_items): every item weighs the same over ranks and micro-batches."""
    def token_loss(model, batch):
        x, y = batch
        keep = y != 0  # class 0 does not count: a different number of items per rank and micro-batch
        per_item = nn.functional.cross_entropy(model(x), y, reduction="none")
        n = keep.sum()
        return (per_item * keep).sum() / n.clamp(min=1), n

    t = trainer(tp.model(), "sgd", strategy="fsdp", tp_size=2, tp_plan=tp.PLAN, gradient_accumulation_steps=2,
                compute_loss=token_loss)
    t.fit(my_batches(t, 0, 8), num_epochs=1)
    return {"weights": full_weights(t.module), "history": t.history}


def nonfinite() -> dict:
    """A NaN loss with finite gradients (a term that does not depend on the weights) in data-parallel rank 1's
    batch of the second window: only that shard's ranks see it, and every rank skips that step."""
    def loss_with_term(model, batch):
        x, y, term = batch
        return nn.functional.cross_entropy(model(x), y) + term

    t = trainer(tp.model(), strategy="fsdp", tp_size=2, tp_plan=tp.PLAN, gradient_accumulation_steps=2,
                on_nonfinite="skip", compute_loss=loss_with_term)
    batches = [(x, y, torch.tensor(0.0)) for x, y in my_batches(t, 0, 8)]
    if t.strategy.data_rank == 1:
        batches[3] = (*batches[3][:2], torch.tensor(float("nan")))
    t.fit(batches, num_epochs=1)
    return {"weights": full_weights(t.module), "steps": t.global_step, "history": t.history}


def mismatch() -> dict:
    """Per-rank loaders built from the rank instead of the data-parallel rank: an error naming the ranks."""
    t = trainer(tp.model(), strategy="fsdp", tp_size=2, tp_plan=tp.PLAN)
    x, y = tp.data()
    try:
        t.fit(tp.rank_batches(tp.global_batches(x, y, 0, 4), t.rank, t.world_size), num_epochs=1)
    except ValueError as exc:
        return {"error": str(exc), "steps": t.global_step}
    return {"error": None, "steps": t.global_step}


def llama() -> dict:
    """A transformers LlamaForCausalLM split by its own plan (tp_plan not given), 2-D, 2 steps."""
    model = tp.llama()
    t = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), strategy="fsdp", tp_size=2, **QUIET)
    ids = tp.llama_ids()
    d, dw = t.strategy.data_rank, t.strategy.data_world_size
    t.fit([{"input_ids": b[d::dw], "labels": b[d::dw]} for b in ids], num_epochs=1)
    return {"weights": full_weights(t.module), "plan": {k: type(v).__name__ for k, v in t.config.tp_plan.items()}}


def gpt2() -> dict:
    """GPT-2 (transformers' Conv1D layers) split by the example's plan, 2-D, K=2, token-weighted: 2 steps."""
    model = tp.gpt2()
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), compute_loss=train_gpt2.token_loss,
                strategy="fsdp", tp_size=2, tp_plan=train_gpt2.gpt2_tp_plan(), gradient_accumulation_steps=2, **QUIET)
    d, dw = t.strategy.data_rank, t.strategy.data_world_size
    t.fit([{key: value[d::dw] for key, value in batch.items()} for batch in tp.gpt2_batches()], num_epochs=1)
    return {"weights": full_weights(t.module), "steps": t.global_step}


def example() -> dict:
    """launch/train_gpt2.py itself (the function behind its entry point): --tp 2 --strategy fsdp, with
    activation checkpointing."""
    return train_gpt2.main(["--tp", "2", "--strategy", "fsdp", "--activation-checkpointing", "--max-steps", "12",
                            "--epochs", "3", "--log-interval", "4"])


def resume_same_layout() -> dict:
    """2-D with dropout and a shuffled loader: stopped mid-epoch at step 3, saved, resumed: bit for bit."""
    def run(callbacks=(), resume=None) -> Trainer:
        t = trainer(tp.model("deep"), strategy="fsdp", tp_size=2, tp_plan=tp.BLOCK_PLAN, gradient_accumulation_steps=2,
                    callbacks=list(callbacks))
        x, y = tp.data()
        t.fit(DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True), max_steps=10, resume_from=resume)
        return t

    straight = run()
    mid_epoch()
    stopped = run([StopAt(3)])
    position = (stopped.global_step, stopped.batch_in_epoch)
    stopped.save_in_dir(OUT / "same", "stop")
    resumed = run(resume=OUT / "same" / "stop.ckpt")
    return {"straight": full_weights(straight.module), "resumed": full_weights(resumed.module),
            "position": position, "history": (straight.history, resumed.history)}


def mid_epoch() -> None:
    """2x2, a DataLoader anndist shards (4 per rank, no shuffling), stopped after step 4 of 8 and saved
    mid-epoch, for the test's 2-rank DDP continuation (2 data shards before and after)."""
    t = trainer(tp.model(), "sgd", strategy="fsdp", tp_size=2, tp_plan=tp.PLAN, gradient_accumulation_steps=2,
                callbacks=[StopAt(3)])
    x, y = tp.data()
    t.fit(DataLoader(TensorDataset(x, y), batch_size=4), num_epochs=1)
    t.save_in_dir(OUT / "mid", "mid")


def fsdp_to_2d_dropout() -> dict:
    """4-rank FSDP with dropout, saved at an epoch's end; a 2x2 Trainer goes on: the ranks of each
    tensor-parallel group take one saved RNG stream, so their dropout masks and weights stay the same."""
    t = trainer(tp.model("deep"), strategy="fsdp", gradient_accumulation_steps=2)
    t.fit(my_batches(t, 0, 4), num_epochs=1)
    t.save_in_dir(OUT / "fsdp4_dropout", "two")
    two_d = trainer(tp.model("deep"), strategy="fsdp", tp_size=2, tp_plan=tp.BLOCK_PLAN, gradient_accumulation_steps=2)
    two_d.fit(my_batches(two_d, 4, 4), num_epochs=2, resume_from=OUT / "fsdp4_dropout" / "two.ckpt")
    return {"weights": full_weights(two_d.module), "steps": two_d.global_step}


def fsdp_to_2d() -> dict:
    """4-rank FSDP (no TP), 4 steps, saved; loaded by a 2x2 Trainer that trains 2 more steps."""
    t = trainer(tp.model(), strategy="fsdp", gradient_accumulation_steps=2,
                shard_modules=lambda m: isinstance(m, nn.Linear))
    t.fit(my_batches(t, 0, 8), num_epochs=1)
    t.save_in_dir(OUT / "fsdp4", "four")
    two_d = trainer(tp.model(seed=1), strategy="fsdp", tp_size=2, tp_plan=tp.PLAN, gradient_accumulation_steps=2)
    two_d.fit(my_batches(two_d, 8, 4), num_epochs=2, resume_from=OUT / "fsdp4" / "four.ckpt")
    two_d.save_in_dir(OUT / "two_d", "six")  # for the 1x2 and one-process continuations (in the tests)
    return {"four": full_weights(t.module), "six": full_weights(two_d.module), "steps": two_d.global_step}


RUNS = {f.__name__: f for f in (held_out, global_batch, activation_checkpointing, items, nonfinite, mismatch, llama, gpt2,
                                 example, resume_same_layout, fsdp_to_2d, fsdp_to_2d_dropout)}
RUNS["ddp_tp"] = lambda: with_loader("ddp")
RUNS["fsdp_tp"] = lambda: with_loader("fsdp")


@record
def main() -> None:
    global OUT
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT = Path(args.out)
    dist.init_process_group("gloo")  # the runs' Trainers share it (a Trainer that created it would close it)
    results = {name: RUNS[name]() for name in args.runs.split(",")}  # a run that raises ends the launch
    torch.save(results, OUT / f"rank{dist.get_rank()}.pt")
    gc.collect()  # the runs' DDP wrappers go before the group (gloo ranks then exit 0)
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()

if __name__ == "__main__":
    main()
