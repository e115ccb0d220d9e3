"""A short run on real ranks, for the CUDA tests (tests/gpu/test_cuda.py) and their CPU dry run.

    torchrun --standalone --nproc_per_node=N tests/gpu/ranks.py --out DIR [--device D] [--backend B]
        [--own-group B] [--amp bf16|fp16]

Trains a small MLP (2 epochs, accumulation K=2, shuffling, pinned memory on CUDA, validation), then
evaluates, predicts, saves a checkpoint and loads it into a fresh Trainer. ``--own-group`` creates the
default group here first (a 1-rank NCCL group: torchrun with one process does not make the Trainer
create one) and checks one all-reduce and one object gather on it. Each rank writes ``DIR/rank{r}.pt``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]  # support (models), and this checkout's anndist
from support import flat_params, make_dataset, make_model  # noqa: E402

from anndist import Trainer  # noqa: E402


def _group_check(backend: str) -> dict:
    """Create the default group ourselves and run one tensor and one object collective on it."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(backend, **kwargs)
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    ones = torch.ones(4, device=device)
    dist.all_reduce(ones)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rank": dist.get_rank()})
    return {"all_reduce": ones.cpu(), "gathered": gathered}


def _trainer(args: argparse.Namespace, model_seed: int = 0) -> Trainer:
    model = make_model(hidden=32, seed=model_seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    options = {"seed": 7, "gradient_accumulation_steps": 2, "stop_check_period": 0, "progress_bar": False,
               "handle_signals": False}
    if args.device:
        options["device"] = args.device
    if args.backend:
        options["backend"] = args.backend
    if args.amp:
        options.update(use_amp=True, amp_dtype=args.amp)
    return Trainer(model, optimizer, nn.CrossEntropyLoss(), **options)


@record
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--own-group", default=None)
    parser.add_argument("--amp", default=None, choices=["bf16", "fp16"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    result: dict = {}
    if args.own_group:
        result["own_group"] = _group_check(args.own_group)

    trainer = _trainer(args)
    cuda = trainer.device.type == "cuda"
    train_set, val_set = make_dataset(128, seed=0), make_dataset(40, seed=1)
    train_loader = DataLoader(train_set, batch_size=8, shuffle=True, pin_memory=cuda)
    val_loader = DataLoader(val_set, batch_size=8, pin_memory=cuda)
    history = trainer.fit(train_loader, num_epochs=2, val_loader=val_loader)
    evaluation = trainer.evaluate(val_loader)
    predictions = trainer.predict(val_loader)
    ckpt = out / "run.ckpt"
    trainer.save_checkpoint(ckpt)

    fresh = _trainer(args, model_seed=1)  # other weights until the checkpoint is loaded
    fresh.load_checkpoint(ckpt)
    result.update({
        "rank": trainer.rank, "world_size": trainer.world_size, "device": str(trainer.device),
        "param_devices": sorted({str(p.device) for p in trainer.module.parameters()}),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "ddp": trainer.model is not trainer.module, "amp_dtype": str(trainer.precision.dtype),
        "params": flat_params(trainer.module), "history": history, "evaluation": evaluation,
        "predictions": predictions, "targets": val_set.tensors[1], "global_step": trainer.global_step,
        "loaded_params": flat_params(fresh.module), "loaded_step": fresh.global_step,
    })
    torch.save(result, out / f"rank{trainer.rank}.pt")
    fresh.close()
    trainer.close()
    if args.own_group and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
