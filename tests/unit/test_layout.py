"""The tests' own layout (tests/README.md, "Layout"): every test file sits in the folder of its kind, no
file imports a test file (what two test files share lives in tests/support), and a kind starts only the
processes it may: unit tests none, multiprocess tests spawned ranks but no launch.

The checks read imports (run-time and type-checking alike): a name imported from ``support`` that starts
processes, or the modules that start them (``subprocess``, ``multiprocessing``).
"""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
KINDS = ("unit", "multiprocess", "e2e", "gpu")
SPAWNS = {"run_spawn", "multiprocessing", "torch.multiprocessing"}
LAUNCHES = {"torchrun", "python", "run", "launch_pair", "kill_9_during_async_saves", "SlurmCluster", "subprocess"}
MAY_NOT_START = {"unit": SPAWNS | LAUNCHES, "multiprocess": LAUNCHES}


def _imports(source: str) -> list[tuple[str, str | None]]:
    """``(module, name)`` for every import: ``name`` None for ``import module``."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [("." * node.level + (node.module or ""), alias.name) for alias in node.names]
    return found


def imported_test_modules(source: str) -> set[str]:
    """The test modules (``test_*``) that ``source`` imports, however it names them."""
    return {module if name is None else module + ("" if module.endswith(".") else ".") + name
            for module, name in _imports(source)
            if any(part.startswith("test_") for part in module.split(".") + [name or ""])}


def starters(source: str) -> set[str]:
    """What ``source`` imports that starts processes: support's helpers that do, and the modules."""
    found = set()
    for module, name in _imports(source):
        if module.lstrip(".").split(".")[0] == "support" and name in SPAWNS | LAUNCHES:
            found.add(name)
        found |= {module, f"{module}.{name}"} & (SPAWNS | LAUNCHES)
    return found


def _python_files() -> list[Path]:
    return sorted(TESTS.rglob("*.py"))


def test_every_test_file_sits_in_the_folder_of_its_kind():
    misplaced = [str(p.relative_to(TESTS)) for p in TESTS.rglob("test_*.py") if p.parent.parent != TESTS
                 or p.parent.name not in KINDS]
    assert misplaced == [], f"test files outside tests/{{{','.join(KINDS)}}}/: {misplaced}"


def test_no_file_imports_a_test_file():
    importers = {str(p.relative_to(TESTS)): imported_test_modules(p.read_text()) for p in _python_files()}
    assert {path: found for path, found in importers.items() if found} == {}, \
        "move what test files share into tests/support"


def test_each_kind_starts_only_what_it_may():
    wrong = {}
    for kind, forbidden in MAY_NOT_START.items():
        for path in sorted((TESTS / kind).glob("test_*.py")):
            found = starters(path.read_text()) & forbidden
            if found:
                wrong[str(path.relative_to(TESTS))] = sorted(found)
    assert wrong == {}, "a test that spawns ranks goes in tests/multiprocess, one that launches in tests/e2e"


def test_the_checks_see_each_kind_of_import():
    source = ("import test_a\nimport tests.unit.test_b as b\nfrom . import test_c\nfrom .test_d import x\n"
              "from support import run_spawn, make_model\nfrom support.processes import torchrun\n"
              "import subprocess\nfrom torch import multiprocessing\nfrom anndist import Trainer\n")
    assert imported_test_modules(source) == {"test_a", "tests.unit.test_b", ".test_c", ".test_d.x"}
    assert starters(source) == {"run_spawn", "torchrun", "subprocess", "torch.multiprocessing"}
    assert imported_test_modules("from support import make_model\nimport testing") == set()
    assert starters("from support import make_model, full_weights\nimport torch") == set()
