"""How long torch.compile took and how often it compiled again, logged once on rank 0.

The Trainer adds ``CompileReport`` when ``compile=`` is on. The first optimizer step of the first
``fit`` includes the compilation of the training graphs: its time is logged when it ends. When that
``fit`` ends, the graphs compiled since (evaluation under ``no_grad``, a new batch shape, a guard that
failed) are logged as recompilations, from ``torch._dynamo``'s counters. Later fits log nothing.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ..strategies.compile import compiled_graphs
from .base import Callback

if TYPE_CHECKING:
    from ..trainer import Trainer

logger = logging.getLogger(__name__)


class CompileReport(Callback):
    def __init__(self) -> None:
        self.first_step_s: float | None = None
        self.recompilations: int | None = None
        self._started = 0.0
        self._graphs = 0

    def on_train_begin(self, trainer: "Trainer", logs: dict | None = None) -> None:
        if self.first_step_s is None:
            self._started, self._graphs = time.perf_counter(), compiled_graphs()

    def on_batch_end(self, batch_idx: int, trainer: "Trainer", logs: dict | None = None) -> None:
        if self.first_step_s is not None or not (logs or {}).get("ends_window"):
            return
        self.first_step_s = time.perf_counter() - self._started
        graphs = compiled_graphs()
        first, self._graphs = graphs - self._graphs, graphs
        logger.info("torch.compile: the first optimizer step took %.1f s, compiling %d graph(s) included",
                    self.first_step_s, first)

    def on_train_end(self, trainer: "Trainer", logs: dict | None = None) -> None:
        if self.first_step_s is None or self.recompilations is not None:
            return
        self.recompilations = compiled_graphs() - self._graphs
        logger.info("torch.compile: %d recompilation(s) after the first step in this fit (evaluation without "
                    "gradients, new batch shapes); TORCH_LOGS=recompiles says why", self.recompilations)
