"""A ``DistributedSampler`` built before the Trainer: torch's error, followed by what to do.

``DistributedSampler(dataset)`` asks the default process group for the world size and rank, so built
before the Trainer (which creates the group) it fails with torch's "Default process group has not
been initialized", which says nothing of the fix. anndist does not need that sampler: ``fit`` shards a
plain ``DataLoader(dataset, batch_size=..., shuffle=True)`` across ranks itself. Importing anndist
chains a hook onto ``sys.excepthook`` that adds this as a note to that one error, raised from
``DistributedSampler``'s constructor, when it ends the program; every other exception is printed as
before, by the hook that was there.
"""
from __future__ import annotations

import sys
from types import TracebackType

HINT = ("anndist: this DistributedSampler was built before the process group exists (the Trainer creates it). "
        "With anndist you need none: pass DataLoader(dataset, batch_size=..., shuffle=True) to fit() and the "
        "Trainer shards it across ranks with a resumable DistributedSampler seeded by Trainer(seed=...), calling "
        "set_epoch for you; or build the Trainer first, then the sampler")


def explains(exc: BaseException) -> bool:
    """True for torch's "process group not initialized" error raised inside ``DistributedSampler.__init__``."""
    if "process group" not in str(exc) or "not been initialized" not in str(exc):
        return False
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        filename = code.co_filename.replace("\\", "/")
        if code.co_name == "__init__" and filename.endswith("torch/utils/data/distributed.py"):
            return True
        tb = tb.tb_next
    return False


def install() -> None:
    """Chain the hint onto ``sys.excepthook`` (once per process; the previous hook prints everything)."""
    previous = sys.excepthook
    if getattr(previous, "adds_sampler_hint", False):
        return

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if explains(exc) and HINT not in getattr(exc, "__notes__", ()):
            if hasattr(exc, "add_note"):
                exc.add_note(HINT)
                previous(kind, exc, tb)
                return
            previous(kind, exc, tb)
            print(HINT, file=sys.stderr)
            return
        previous(kind, exc, tb)

    hook.adds_sampler_hint = True  # type: ignore[attr-defined]
    sys.excepthook = hook
