"""launch/train_digits.py with a live straggler check that checkpoints and exits (action="exit"), and
on the host named by SLOW_HOST a forward pass SLOW_MS milliseconds slower (a sleep before it).

The delay only makes that node slow: the StragglerCallback finds it from the step times it measures,
knowing nothing of SLOW_HOST. Same model, data, seed and options as train_digits.py, so an
uninterrupted run reaches the very weights of train_digits.py's, and a resumed one must too.

    python tests/support/scripts/straggler_train.py --epochs 6 --checkpoint-dir CKPT --save weights.pt
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "launch")]

import train_digits  # noqa: E402
from anndist import StragglerCallback  # noqa: E402
from anndist.dist.host import host_name  # noqa: E402

CHECK = {"every_n_steps": 10, "patience": 2, "threshold": 0.2, "min_cost": 0.5, "action": "exit"}
_observers, _model = train_digits.observers, train_digits.digits_model


def observers(args):
    """train_digits' callbacks, then the straggler check (after LoggingCallback: it may end the process)."""
    return [*_observers(args), StragglerCallback(**CHECK)]


def digits_model(*args, **kwargs):
    model = _model(*args, **kwargs)
    slow_ms = float(os.environ.get("SLOW_MS", "50"))
    if os.environ.get("SLOW_HOST") and host_name(os.environ) == os.environ["SLOW_HOST"]:
        model.register_forward_pre_hook(lambda module, inputs: time.sleep(slow_ms / 1e3))
    return model


train_digits.observers, train_digits.digits_model = observers, digits_model

if __name__ == "__main__":
    train_digits.main()
