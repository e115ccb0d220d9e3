"""Where a callback that judges a metric (EarlyStopping, ModelCheckpoint's best) finds it, and the
check at ``fit``'s start that it will be there.

Each evaluation of ``fit`` is judged once: in epoch mode at ``on_epoch_end`` (the epoch's
``train_loss`` and, with a val loader, the ``val_*`` metrics), in step mode
(``fit(eval_every_n_steps=N)``) at ``on_evaluate_end`` with ``logs["when"] == "step"`` (the ``val_*``
metrics only). A monitor that cannot be among them is an error when ``fit`` starts, not after a
whole epoch of training.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..trainer import Trainer


def step_mode(trainer: "Trainer") -> bool:
    """Whether the current ``fit`` evaluates every N steps (and never at epoch ends)."""
    return getattr(trainer, "eval_every_n_steps", None) is not None


def check_monitor(owner: str, monitor: str, trainer: "Trainer", logs: dict | None) -> None:
    """Raise a ValueError naming ``owner`` when ``monitor`` will never be among the metrics it judges.

    ``logs`` are ``on_train_begin``'s; ``validates`` says whether ``fit`` has a val loader. Only the
    metrics that are there or not by the run's plan are checked: ``val_accuracy`` (classification
    only) is found out at the first evaluation, as before.
    """
    validates = bool((logs or {}).get("validates", True))
    names = sorted(getattr(trainer, "metrics", None) or {})
    val = ["val_loss", "val_accuracy"] + [f"val_{name}" for name in names]
    if monitor.startswith("val_") and not validates:
        raise ValueError(f"{owner}(monitor={monitor!r}) needs validation metrics, and fit() has no val_loader: pass "
                         "val_loader=... to fit(), or monitor 'train_loss'")
    if step_mode(trainer):
        if monitor not in val:
            raise ValueError(
                f"{owner}(monitor={monitor!r}): fit(eval_every_n_steps={trainer.eval_every_n_steps}) judges the "
                f"step evaluations, whose metrics are {val}; monitor one of those")
        return
    if monitor != "train_loss" and monitor not in val:
        raise ValueError(f"{owner}(monitor={monitor!r}) is not a metric of an epoch: they are "
                         f"{['train_loss'] + (val if validates else [])}")
