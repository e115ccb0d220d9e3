"""Callbacks: the only way to add behaviour to the Trainer.

Nine lifecycle hooks, called on every rank in list order (so a callback may take part in collectives):

    on_train_begin
      on_epoch_begin(epoch)
        on_batch_begin(batch_idx) -> forward -> backward -> on_backward_end(batch_idx)
          -> [optimizer step at the end of an accumulation window] -> on_batch_end(batch_idx)
        on_evaluate_begin -> on_evaluate_end            (when there is a val loader)
      on_epoch_end(epoch)
    on_train_end

and a tenth, ``on_exception(exc)``, called on every rank when ``fit`` raises (a callback or the
training step failed, or a rank got an error from a collective), before the process group is torn
down: callbacks release what they hold there (signal handlers, open files, profiler hooks).
``docs/callbacks.md`` lists what each hook's ``logs`` holds.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable

from ..checks import check_keywords

if TYPE_CHECKING:
    from ..trainer import Trainer

logger = logging.getLogger(__name__)

HOOKS = (
    "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_batch_begin",
    "on_batch_end", "on_backward_end", "on_evaluate_begin", "on_evaluate_end", "on_exception",
)


class Callback:
    """Base class: override the hooks you need. Each receives ``trainer`` and ``logs``.

    A subclass's ``__init__`` that takes no ``**kwargs`` answers a misspelt keyword with the closest
    one it takes ("did you mean"), as the Trainer does for its options.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "__checks_keywords__", False):
            cls.__init__ = check_keywords(init)  # type: ignore[misc]

    def on_train_begin(self, trainer: "Trainer", logs: dict | None = None) -> None: ...
    def on_train_end(self, trainer: "Trainer", logs: dict | None = None) -> None: ...
    def on_epoch_begin(self, epoch: int, trainer: "Trainer", logs: dict | None = None) -> None: ...
    def on_epoch_end(self, epoch: int, trainer: "Trainer", logs: dict | None = None) -> None: ...
    def on_batch_begin(self, batch_idx: int, trainer: "Trainer", logs: dict | None = None) -> None: ...
    def on_batch_end(self, batch_idx: int, trainer: "Trainer", logs: dict | None = None) -> None: ...
    def on_backward_end(self, batch_idx: int, trainer: "Trainer", logs: dict | None = None) -> None: ...
    def on_evaluate_begin(self, trainer: "Trainer", logs: dict | None = None) -> None: ...
    def on_evaluate_end(self, trainer: "Trainer", logs: dict | None = None) -> None: ...
    def on_exception(self, exc: BaseException, trainer: "Trainer", logs: dict | None = None) -> None: ...


class CallbackError(RuntimeError):
    """A callback raised; the message names the callback, the hook and the rank."""


class CallbackList:
    """Calls each hook on every callback, in order; only callbacks that override a hook are called."""

    def __init__(self, callbacks: Iterable[Callback] | None = None, rank: int = 0) -> None:
        self.callbacks: list[Callback] = []
        self.rank = rank
        self._by_hook: dict[str, list[Callback]] = {hook: [] for hook in HOOKS}
        self._closing: list[Any] = []  # run_at_end's functions, until end_run()
        for callback in callbacks or ():
            self.append(callback)

    def append(self, callback: Callback) -> None:
        if not isinstance(callback, Callback):
            raise TypeError(
                f"callbacks must be anndist.Callback instances, got {type(callback).__name__}; "
                "subclass anndist.Callback"
            )
        self.callbacks.append(callback)
        for hook in HOOKS:
            # Skipping hooks that a callback does not override keeps the per-batch cost at zero.
            if getattr(getattr(callback, hook), "__func__", None) is not getattr(Callback, hook):
                self._by_hook[hook].append(callback)

    def __iter__(self):
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    def has(self, hook: str) -> bool:
        return bool(self._by_hook[hook])

    def call(self, hook: str, *args: Any, trainer: "Trainer", logs: dict | None = None) -> None:
        for callback in self._by_hook[hook]:
            try:
                getattr(callback, hook)(*args, trainer, logs)
            except Exception as exc:
                raise CallbackError(
                    f"{type(callback).__name__}.{hook} raised {type(exc).__name__}: {exc} (rank {self.rank})"
                ) from exc

    def run_at_end(self, fn: Any) -> None:
        """Run ``fn()`` once every ``on_train_end`` has run (and a preemption has saved), as the run's
        last output: ``end_run`` calls it, from ``fit`` or from a callback that ends the process."""
        self._closing.append(fn)

    def end_run(self) -> None:
        closing, self._closing = self._closing, []
        for fn in closing:
            fn()

    def call_on_exception(self, exc: BaseException, trainer: "Trainer") -> None:
        """``on_exception`` on every callback; a failure there is logged, never raised over ``exc``."""
        self._closing = []  # a run that raised has no closing line
        for callback in self._by_hook["on_exception"]:
            try:
                callback.on_exception(exc, trainer, {})
            except Exception as error:  # the original exception is the one to report
                logger.error("%s.on_exception raised %s: %s (while handling %s)",
                             type(callback).__name__, type(error).__name__, error, type(exc).__name__)

    def state_dict(self) -> dict[str, Any]:
        """State of the callbacks that have ``state_dict()``, keyed by class name and position."""
        return {self._key(i, cb): cb.state_dict() for i, cb in enumerate(self.callbacks)
                if hasattr(cb, "state_dict")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, callback in enumerate(self.callbacks):
            key = self._key(i, callback)
            if key in state and hasattr(callback, "load_state_dict"):
                callback.load_state_dict(state[key])

    @staticmethod
    def _key(index: int, callback: Callback) -> str:
        return f"{index}:{type(callback).__name__}"
