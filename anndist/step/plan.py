"""How long a run trains and when it validates: ``fit``'s ``num_epochs``, ``max_steps`` and
``eval_every_n_steps``, checked when ``fit`` starts."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any, Iterable

from ..checks import check_count
from .train_state import TrainState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    num_epochs: int | None
    max_steps: int | None
    eval_every_n_steps: int | None

    @classmethod
    def check(cls, num_epochs: Any, max_steps: Any, eval_every_n_steps: Any, train_loader: Iterable,
              val_loader: Iterable | None) -> "RunPlan":
        for name, value, minimum in (("num_epochs", num_epochs, 0), ("max_steps", max_steps, 1),
                                     ("eval_every_n_steps", eval_every_n_steps, 1)):
            check_count(name, value, minimum, optional=True)
        if num_epochs is None and max_steps is None:
            raise ValueError("fit() needs num_epochs=... or max_steps=... (or both: whichever comes first)")
        if eval_every_n_steps is not None and val_loader is None:
            raise ValueError(f"eval_every_n_steps={eval_every_n_steps} needs a val_loader to evaluate on")
        if isinstance(train_loader, Iterator) and (num_epochs or 0) > 1:
            raise ValueError(
                f"train_loader is a one-shot iterator ({type(train_loader).__name__}): it is empty after the first "
                f"epoch, so num_epochs={num_epochs} cannot be trained; pass something that can be iterated again "
                "(a DataLoader, a list, or an object whose __iter__ returns a new iterator), or use max_steps")
        return cls(num_epochs, max_steps, eval_every_n_steps)

    def warn_if_never_evaluating(self, loader: Iterable, accumulation_steps: int) -> None:
        """Say at the start when ``eval_every_n_steps`` is more than the optimizer steps this plan reaches
        (``max_steps``, or ``num_epochs`` of a loader with a length): no evaluation would ever run."""
        if self.eval_every_n_steps is None:
            return
        last = [self.max_steps] if self.max_steps is not None else []
        try:
            batches = len(loader)  # type: ignore[arg-type]
        except TypeError:  # a stream: only max_steps says
            batches = None
        if self.num_epochs is not None and batches is not None:
            last.append(self.num_epochs * -(-batches // accumulation_steps))
        if last and min(last) < self.eval_every_n_steps:
            logger.warning(
                "eval_every_n_steps=%d is more than the %d optimizer steps this fit() trains to: it will never "
                "evaluate (the val_loader goes unused, and nothing that monitors val_* metrics gets any); lower it",
                self.eval_every_n_steps, min(last))

    def done(self, state: TrainState) -> bool:
        return (self.num_epochs is not None and state.epoch >= self.num_epochs) or self.steps_done(state)

    def steps_done(self, state: TrainState) -> bool:
        return self.max_steps is not None and state.global_step >= self.max_steps

    def evaluates_after(self, step: int) -> bool:
        return self.eval_every_n_steps is not None and step % self.eval_every_n_steps == 0
