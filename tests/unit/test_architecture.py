"""The package's shape: its import graph has no cycle, and the checkpoint code does not know the Trainer.

Run-time imports only: imports under ``if TYPE_CHECKING:`` are for annotations and never run. An
import inside a function counts too (a late import that dodges a cycle is still a cycle).
"""
from __future__ import annotations

import ast
from pathlib import Path

import anndist

PACKAGE = Path(anndist.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """Modules of anndist that ``path`` imports when it runs."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    skipped = {id(node) for node in ast.walk(tree) if isinstance(node, ast.If)
               and "TYPE_CHECKING" in ast.unparse(node.test) for node in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import x` names a module
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules and name != me}


def graph() -> dict[str, set[str]]:
    return {module_name(p): runtime_imports(p) for p in PACKAGE.rglob("*.py")}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_has_no_cycle():
    edges = graph()
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for name in edges:
        edges[name] = {t for t in edges[name] if not name.startswith(t + ".")}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_checkpoint_code_imports_neither_the_trainer_nor_callbacks():
    edges = graph()
    for name, targets in edges.items():
        if name.startswith("anndist.checkpoint"):
            assert not {t for t in targets if t.startswith(("anndist.trainer", "anndist.callbacks"))}, name


def test_only_the_strategies_know_kinds_of_model():
    """No module outside strategies/ names FSDP's classes or functions, a DTensor's local part or its
    layout, tensor parallelism's mesh and styles, or tests which strategy runs (or whether tensor
    parallelism is on): the Trainer and the step ask the strategy instead."""
    import re
    forbidden = re.compile(r"FSDPModule|fully_shard|to_local|strategy\s*[!=]=|[!=]=\s*[\"'](ddp|fsdp)[\"']"
                           # tensor parallelism: the mesh, the styles, DTensor internals, replicas over a mesh
                           r"|parallelize_module|init_device_mesh|DeviceMesh|\bParallelStyle\b|ColwiseParallel"
                           r"|RowwiseParallel|_local_tensor|full_tensor|placements|device_mesh|replicate_with_fsdp"
                           r"|tp_size\s*[<>!=]")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "strategies":
            continue
        offenders += [f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
                      for n, line in enumerate(path.read_text().splitlines(), 1) if forbidden.search(line)]
    assert not offenders, "\n".join(offenders)


def test_a_dozen_modules_or_fewer_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 12, top


def test_the_trainer_signature_lists_every_option():
    import inspect
    from anndist import Trainer, TrainerConfig
    parameters = inspect.signature(Trainer.__init__).parameters.values()
    keyword_only = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY]
    assert keyword_only == TrainerConfig.names()
    assert all(p.annotation is not inspect.Parameter.empty for p in parameters if p.kind is p.KEYWORD_ONLY)
