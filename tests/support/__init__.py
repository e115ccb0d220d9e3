"""What the tests share: real ranks, real launches, small models; nothing here is a test.

Everyday helpers come from the package itself (``from support import run_spawn, make_model, torchrun``);
the rest from their modules (``from support.callbacks import Records``,
``from support.exit_trials import launch_pair``). Test files never import each
other: what two of them share lives here. ``scripts/`` holds the entry points that tests launch.
"""
from .models import flat_params, full_weights, make_dataset, make_model
from .processes import ROOT, child_env, python, run, torchrun
from .spawn_ranks import run_spawn

__all__ = ["ROOT", "child_env", "flat_params", "full_weights", "make_dataset", "make_model",
           "python", "run", "run_spawn", "torchrun"]
