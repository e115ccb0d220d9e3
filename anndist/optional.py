"""Optional packages: one clear message per missing one, naming the ``pip install`` that fixes it.

anndist itself needs only torch and numpy. The callbacks and tools below import their package when
they are built, and a missing one raises :class:`MissingDependencyError` (an ``ImportError``) whose
message is a single line, so an entry script can print it once (on rank 0) instead of one traceback
per rank. Each names the extra that installs it (``pip install 'anndist[hf]'``, ...).
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# import name -> (pip name, the anndist extra that installs it)
PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "matplotlib": ("matplotlib", "plot"),
    "tqdm": ("tqdm", "progress"),
    "sklearn": ("scikit-learn", "examples"),
    "transformers": ("transformers", "hf"),
    "torchmetrics": ("torchmetrics", "hf"),
    "torchdata": ("torchdata", "stream"),
    "mlflow": ("mlflow-skinny", "mlflow"),
    "wandb": ("wandb", "wandb"),
}
EXAMPLES_EXTRA = "examples"  # the digits examples' packages: the first four above
IN_EXAMPLES = ("tensorboard", "matplotlib", "tqdm", "sklearn")


class MissingDependencyError(ImportError):
    """An optional package is not installed (or fails to import); the message says how to install it."""


def install_hint(module: str) -> str:
    """The pip command that installs the optional package imported as ``module`` (or a submodule of it)."""
    package = module.partition(".")[0]
    if package not in PACKAGES:
        raise ValueError(f"{module!r} is not one of anndist's optional packages {sorted(PACKAGES)}")
    extra = PACKAGES[package][1]
    hint = f"pip install 'anndist[{extra}]'"
    if extra == EXAMPLES_EXTRA or package not in IN_EXAMPLES:
        return hint
    return f"{hint} (or 'anndist[{EXAMPLES_EXTRA}]' for everything the digits examples use)"


def require_installed(module: str, needed_by: str) -> None:
    """Like :func:`require`, without importing ``module`` now (for packages slow to import, such as mlflow):
    a :class:`MissingDependencyError` when it is not installed."""
    hint = install_hint(module)
    package = module.partition(".")[0]
    if importlib.util.find_spec(package) is None:
        raise MissingDependencyError(f"{needed_by} needs {PACKAGES[package][0]}, which is not installed: {hint}",
                                     name=package)


def require(module: str, needed_by: str) -> ModuleType:
    """Import the optional package ``module`` (``"sklearn.datasets"`` works too) for ``needed_by`` (a
    feature's name), or raise :class:`MissingDependencyError` with a one-line message naming the fix."""
    hint = install_hint(module)
    package = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pip_name = PACKAGES[package][0]
        cause = "is not installed" if isinstance(exc, ModuleNotFoundError) and exc.name in (package, module) \
            else f"fails to import ({type(exc).__name__}: {' '.join(str(exc).split())})"
        raise MissingDependencyError(f"{needed_by} needs {pip_name}, which {cause}: {hint}",
                                     name=package) from exc
