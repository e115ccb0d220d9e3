"""Where anndist's extra time per optimizer step goes, measured in place (run by hand).

    python tests/bench/peers/ablations.py --nprocs 1 --steps 1000 --epochs 3
    python tests/bench/peers/ablations.py --nprocs 2 --steps 500 --epochs 3

interleaved.py times anndist against the hand-written loop step by step. This runs it once per row,
each row with more of anndist's per-step work swapped for what the hand-written loop does instead
(classes patched inside the ranks before the Trainer is built; the library itself is unchanged):

  as shipped           the defaults
  no check             the step neither checks gradients and losses for NaN/inf nor carries the
                       losses into DDP's all-reduce: a guarantee off, a NaN would reach the weights
  bare micro-batch     each micro-batch is ``criterion(model(x), y)``, its detached loss kept by the
                       window, ``(loss * weight).backward()`` (DDP's ``no_sync`` kept): no batch
                       contract, loss step, autocast switch or precision indirection
  bare window end      the window ends in ``optimizer.step()``, ``zero_grad``, the epoch's sums and
                       the window's reset: no correction, policy or scheduler branches
  hand-written loop    the whole epoch loop inside ``fit`` is the hand-written one (the floor: the
                       method reads 1.00x here), and the same with the check alone added back

The drop from the first row is what the removed work costs in place, where it shares caches and
branch predictors with the step's kernels (several times what the same code costs timed alone in a
loop: the check is ~8 us alone). The fifth row keeps the Trainer's loop (the epoch reader's
look-ahead, the hooks' guards, the plan, the stop agreement), the window's bookkeeping and the
losses' detach. ``--checks`` compares the fused check with other ways to find a NaN among the
gradients. ``interleaved.py --calibrate`` gives the method's own bias (0.995x at 1 process).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[1]), str(HERE)]
import interleaved  # noqa: E402
from alternating import hand_epoch  # noqa: E402

ROWS = {
    "as shipped": (),
    "no check": ("check",),
    "bare micro-batch": ("micro_batch",),
    "no check, bare micro-batch": ("check", "micro_batch"),
    "no check, bare micro-batch and window end": ("check", "micro_batch", "window_end"),
    "hand-written loop inside fit": ("hand_loop",),
    "hand-written loop inside fit, with the check": ("hand_loop", "hand_check"),
}


CHECK_ROWS = {  # --checks: other ways to find a NaN/inf among the gradients (the window's losses left out)
    "fused check, gradients only": ("grads_only",),
    "no check": ("check",),
    "per-gradient sums": ("grads_only", "sums"),
    "_foreach_norm": ("grads_only", "foreach_norm"),
    "numpy sums": ("grads_only", "numpy_sums"),
}
CHECKS = {
    "sums": lambda grads: not torch.isfinite(torch.stack([g.sum() for g in grads]).sum()).item(),
    "foreach_norm": lambda grads: not torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()).item(),
    "numpy_sums": lambda grads: not math.isfinite(sum(float(g.numpy().sum()) for g in grads)),
}


def bare_micro_batch(self: Any, batch: Any, sync: bool) -> tuple[torch.Tensor, int, Any]:
    inputs, targets = batch
    n = targets.shape[0]
    with contextlib.nullcontext() if sync or self.model is self.module else self.model.no_sync():
        loss = self.criterion(self.model(inputs), targets)
        detached = loss.detach()
        weight, count = self.window.add(detached, n, None)
        if sync and self.optimizer_step.carries_losses:
            self.optimizer_step.carry_losses(self.window.losses)
        (loss * weight).backward()
    return detached, n, count


def bare_window_end(self: Any, where: Any) -> bool:
    step, window = self.optimizer_step, self.window
    if step._scale_and_check(1.0, None if step.carries_losses else window.losses):
        raise FloatingPointError(f"non-finite gradient at {where()}")
    step.optimizer.step()
    step.optimizer.zero_grad(set_to_none=True)
    self.epoch_sums.add_window(window.losses, window.counts, True)
    window.reset()
    return True


def hand_loop(self: Any, loader: Any, first_idx: int, check: bool = False) -> bool:
    """``Trainer._run_batches`` as alternating.py's hand-written epoch on the Trainer's model, optimizer
    and loader (``check``: the step's NaN check before each optimizer step)."""
    def checked() -> None:
        if self._optimizer_step._scale_and_check(1.0, None):
            raise FloatingPointError("non-finite gradient")

    loss = hand_epoch(self.model, self.module, self.optimizer, self.criterion, loader, checked if check else None)
    self.state.global_step += len(loader) // interleaved.K  # the windows it stepped
    self.epoch_sums.add_window([loss.detach()], [1], True)  # fit reads the epoch's loss
    return True


def ablate(parts: tuple[str, ...]) -> None:
    from anndist.step.optimization import OptimizerStep
    from anndist.step.train_step import TrainStep
    from anndist.trainer import Trainer
    if "check" in parts:
        OptimizerStep._scale_and_check = lambda self, correction, losses: False
        OptimizerStep.carry_losses = lambda self, losses: None
    if "grads_only" in parts:
        check = OptimizerStep._scale_and_check
        OptimizerStep._scale_and_check = lambda self, correction, losses: check(self, correction, None)
    for name, other in CHECKS.items():
        if name in parts:
            OptimizerStep._check_group = lambda self, grads, correction, losses, other=other: other(grads)
    if "micro_batch" in parts:
        TrainStep._forward_backward = TrainStep.micro_batch = bare_micro_batch
    if "window_end" in parts:
        TrainStep.finish_window = bare_window_end
    if "hand_loop" in parts:
        Trainer._run_batches = lambda self, loader, first_idx: hand_loop(self, loader, first_idx, "hand_check" in parts)


def ablated_ranks(rank: int, world_size: int, parts: tuple[str, ...], steps: int,
                  epochs: int) -> dict[str, list[tuple[float, ...]]]:
    ablate(parts)
    return interleaved.ranks_main(rank, world_size, steps, epochs, own_cost=True)  # anndist's own work only


def run_row(parts: tuple[str, ...], nprocs: int, steps: int, epochs: int) -> dict[str, list[tuple[float, ...]]]:
    """One row in fresh processes (the patches stay in them); one process runs without a process group,
    as interleaved.py does."""
    if nprocs > 1:
        from support import run_spawn
        return run_spawn(ablated_ranks, nprocs, parts, steps, epochs)[0]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(ablated_ranks, 0, 1, parts, steps, epochs).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per run (after a warm-up epoch)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="every row runs once per round, rows in turn, so the VM's drift reaches all rows alike")
    parser.add_argument("--checks", action="store_true", help="compare ways of checking the gradients instead")
    args = parser.parse_args()
    rows = CHECK_ROWS if args.checks else ROWS
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in rows}
    for round_ in range(args.rounds):
        for name, parts in rows.items():
            figures = run_row(parts, args.nprocs, args.steps, args.epochs)
            hand = statistics.median(1e6 * step[1] for step in figures["hand-written"])
            ratio = interleaved.ratios(figures)
            runs[name].append((ratio["cpu"][0], ratio["wall"][0], hand * (ratio["cpu"][0] - 1)))
            print(f"round {round_}: {name:44s} CPU {ratio['cpu'][0]:.3f}x [{ratio['cpu'][1]:.3f}-{ratio['cpu'][2]:.3f}], "
                  f"hand-written {hand:.0f} us/step", flush=True)
    print(f"\nsmall workload, K={interleaved.K}, {args.nprocs} process(es), turns of one step, {args.epochs} epochs of "
          f"{args.steps} steps per run, {args.rounds} rounds (rank 0); median [min-max] over rounds")
    print(f"{'row':44s}{'CPU anndist / hand-written':>30s}{'wall':>24s}{'extra CPU us/step':>20s}")
    for name, values in runs.items():
        cells = [f"{statistics.median(column):.3f}x [{min(column):.3f}-{max(column):.3f}]" for column in list(zip(*values))[:2]]
        extra = statistics.median(value[2] for value in values)
        print(f"{name:44s}{cells[0]:>30s}{cells[1]:>24s}{extra:20.0f}")


if __name__ == "__main__":
    main()
