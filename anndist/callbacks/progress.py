"""ProgressBarCallback: a tqdm bar on rank 0 (epoch, batch, step, loss, samples/s); nothing elsewhere.

The bar takes part in no collective, so it may be on for one rank and off for another (a terminal
on one node, a log file on the rest). Its loss is therefore rank 0's own, averaged since the last
refresh, and labelled so; ``LoggingCallback`` lines carry the loss averaged over all ranks. Reading
the loss syncs a GPU, so it happens once per ``refresh_s`` seconds, not every step.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from typing import IO, TYPE_CHECKING, Any, Iterable, Mapping

import torch

from ..log import set_console_stream
from ..optional import require
from ..step.train_state import add_weighted
from .base import Callback

if TYPE_CHECKING:
    from ..trainer import Trainer

CI_VARIABLES = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "BUILDKITE", "JENKINS_URL", "TF_BUILD", "TEAMCITY_VERSION")


def progress_bar_wanted(setting: bool | None, environ: Mapping[str, str], stream: IO[str],
                        callbacks: Iterable[Callback] = ()) -> bool:
    """Whether the Trainer should append a bar: ``setting`` if given, else when ``stream`` is a
    terminal, not under CI, and tqdm is installed. Never when the user passed a bar already."""
    if any(isinstance(cb, ProgressBarCallback) for cb in callbacks):
        return False
    if setting is not None:
        return setting
    under_ci = any(environ.get(name, "").lower() not in ("", "0", "false") for name in CI_VARIABLES)
    return _isatty(stream) and not under_ci and importlib.util.find_spec("tqdm") is not None


class ProgressBarCallback(Callback):
    """One tqdm bar per epoch on rank 0; log lines print above it instead of breaking it."""

    def __init__(self, refresh_s: float = 0.5, file: IO[str] | None = None) -> None:
        tqdm = require("tqdm", "the progress bar (Trainer(progress_bar=True) or ProgressBarCallback)").tqdm
        if not isinstance(refresh_s, (int, float)) or isinstance(refresh_s, bool) or refresh_s < 0:
            raise ValueError(f"refresh_s={refresh_s!r} must be a number of seconds >= 0")
        self._tqdm, self.refresh_s, self.file = tqdm, float(refresh_s), file
        self.active = False
        self.bar: Any = None
        self._old_stream: IO[str] | None = None

    def on_train_begin(self, trainer: "Trainer", logs: dict | None = None) -> None:
        self.active = trainer.is_main_process  # the one rank-zero decision
        self._world_size = trainer.strategy.data_world_size  # ranks that read different samples

    def on_epoch_begin(self, epoch: int, trainer: "Trainer", logs: dict | None = None) -> None:
        if not self.active:
            return
        self._close_bar()
        file = self.file or sys.stderr
        logs = logs or {}
        self.bar = self._tqdm(total=logs.get("num_batches"), initial=logs.get("first_batch", 0), desc=f"epoch {epoch}",
                              unit="batch", file=file, dynamic_ncols=True, leave=True)
        self._old_stream = set_console_stream(_AboveBar(self._tqdm, file))
        self._loss_sum, self._items, self._samples, self._batches = None, 0, 0, 0
        self._last = self._started = time.perf_counter()

    def on_batch_end(self, batch_idx: int, trainer: "Trainer", logs: dict | None = None) -> None:
        if not self.active or self.bar is None:
            return
        loss, n = logs["loss"], logs["batch_size"]
        items = logs.get("num_items", n)  # the loss's weight: tokens when the loss step counts them
        if self._loss_sum is None:
            self._loss_sum = torch.zeros((), dtype=torch.float64, device=loss.device)
        add_weighted(self._loss_sum, loss, items)
        self._items += items
        self._samples += n
        self._batches += 1
        now = time.perf_counter()
        if now - self._last >= self.refresh_s:
            self._refresh(trainer, now)

    def on_epoch_end(self, epoch: int, trainer: "Trainer", logs: dict | None = None) -> None:
        if not self.active or self.bar is None:
            return
        self.bar.update(self._batches)  # no rate here: the interval since the last refresh includes evaluation
        shown = {key: f"{logs[key]:.4f}" for key in ("train_loss", "val_loss", "val_accuracy") if key in (logs or {})}
        self.bar.set_postfix(step=trainer.global_step, **shown)  # the epoch's global figures
        self._close_bar()

    def on_train_end(self, trainer: "Trainer", logs: dict | None = None) -> None:
        self._close_bar()

    def _refresh(self, trainer: "Trainer", now: float) -> None:
        postfix: dict[str, Any] = {"step": trainer.global_step}
        if self._samples:
            postfix["rank0 loss"] = f"{self._loss_sum.item() / float(self._items):.4f}"  # one sync per refresh
            # Ranks take the same number of batches per step, so rank 0's count times the world size.
            postfix["samples/s"] = f"{self._samples * self._world_size / max(now - self._last, 1e-9):.0f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(self._batches)
        self._loss_sum, self._items, self._samples, self._batches, self._last = None, 0, 0, 0, now

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            if self._old_stream is not None:
                set_console_stream(self._old_stream)
                self._old_stream = None


class _AboveBar:
    """A stream for the log handler: each line is printed above the bar through ``tqdm.write``."""

    def __init__(self, tqdm: Any, file: IO[str]) -> None:
        self._tqdm, self._file = tqdm, file

    def write(self, text: str) -> None:
        if text.strip():
            self._tqdm.write(text.rstrip("\n"), file=self._file)

    def flush(self) -> None:
        self._file.flush()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
