"""``Trainer(preflight=True | "strict")``: the pre-flight check once the Trainer's process group exists.

The entry script is the running ``__main__`` file, the folder is ``checkpoint_dir``, and the room a
checkpoint needs is estimated from the model: parameters and buffers, plus the optimizer's state,
or twice the parameters while the optimizer holds none yet (Adam's two moments, made at the first
step; an estimate on the large side for plain SGD). Rank 0 logs the table; with ``"strict"`` a
failed check raises on every rank before any training, otherwise it is a warning.
"""
from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import torch

from .run import run_preflight

if TYPE_CHECKING:
    from ..trainer import Trainer

logger = logging.getLogger(__name__)
MODES = (False, True, "strict")


def check_preflight_option(value: Any) -> Any:
    """``preflight`` as given, or an error naming it."""
    if not any(value is mode or (isinstance(value, str) and value == mode) for mode in MODES):
        raise ValueError(f"preflight={value!r} must be False (no check), True (check the nodes and warn) or "
                         "'strict' (check the nodes and raise if a rank fails or lags)")
    return value


def preflight_trainer(trainer: "Trainer") -> None:
    """Run the check on every rank of the Trainer's job; log, warn or raise as ``trainer.config.preflight`` says."""
    cfg = trainer.config
    result = run_preflight(trainer.device, entry_script(), cfg.checkpoint_dir,
                           checkpoint_estimate(trainer.module, trainer.optimizer))
    if result.report:
        logger.info("%s", result.report)
    if result.passed:
        return
    if cfg.preflight == "strict":
        raise RuntimeError(f"{result.summary}; the table above (rank 0's log) names each problem. Fix the job, or "
                           "pass preflight=True to train anyway")
    if trainer.is_main_process:
        logger.warning("%s; training anyway (preflight='strict' would stop here)", result.summary)


def entry_script() -> str | None:
    """The file ``python`` (or torchrun) runs as ``__main__``; None in an interactive session."""
    return getattr(sys.modules.get("__main__"), "__file__", None)


def checkpoint_estimate(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes a whole checkpoint of ``module`` and ``optimizer`` takes, about (see the module docstring)."""
    model = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    return model + (state if state else 2 * params)
