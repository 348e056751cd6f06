"""Import structure (unit tier): protege's module-level imports form no cycle, and the
driver process never loads DeepSpeed or vLLM (they load inside the workers that use them)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "protege"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: top-level statements, also inside
    top-level try/if blocks, but not under `if TYPE_CHECKING:` nor inside functions."""
    found, pending = [], list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody
            pending += [s for handler in node.handlers for s in handler.body]
    return found


def _all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, also those inside functions (lazy ones) and under
    `if TYPE_CHECKING:` (a cycle there still ties the modules together)."""
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def imported_modules(name: str, path: Path, modules: set[str], lazy: bool = False) -> set[str]:
    """The protege modules `name` imports at module level (with `lazy`, also inside
    functions): `from protege.x import y` is protege.x.y when that is a module, else
    protege.x; relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in _all_imports(tree) if lazy else _module_level_imports(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            child = f"{base}.{alias.name}"
            targets.add(child if child in modules else base)
    # Importing a.b.c runs a/__init__ and a/b/__init__ first, except the packages holding
    # `name` itself: those are already being imported, and only an explicit import of one
    # (`from protege.algorithms import f`) depends on what it defines.
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    closed = set(targets)
    for target in targets:
        parts = target.split(".")
        closed.update(".".join(parts[:i]) for i in range(1, len(parts)))
    implicit = (closed - targets) & ancestors
    return {t for t in closed - implicit if t in modules and t != name}


def import_graph(lazy: bool = False) -> dict[str, set[str]]:
    modules = all_modules()
    names = set(modules)
    return {name: imported_modules(name, path, names, lazy) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None when it is acyclic (iterative DFS)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_find_cycle_on_hand_made_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None  # diamond
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"x": set(), "a": {"x", "b"}, "b": {"x", "a"}}) == ["a", "b", "a"]


def test_import_resolution_on_a_hand_made_package(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from p.x import y, not_a_module\n"
        "import p.z\n"
        "if TYPE_CHECKING:\n"
        "    from p import skipped\n"
        "def f():\n"
        "    from p import lazy\n"
    )
    modules = {"p", "p.x", "p.x.y", "p.z", "p.skipped", "p.lazy", "p.mod", "q", "q.r"}
    # p is p.mod's own package: no edge for the p/__init__ that `from p.x` runs first
    assert imported_modules("p.mod", source, modules) == {"p.x", "p.x.y", "p.z"}
    assert imported_modules("p.mod", source, modules, lazy=True) == {
        "p.x",
        "p.x.y",
        "p.z",
        "p.skipped",
        "p.lazy",
    }
    source.write_text("from p import x\nfrom q.r import name\nfrom . import z\n")
    assert imported_modules("p.mod", source, modules) == {"p.x", "p.z", "q", "q.r"}
    source.write_text("from p import defined_in_init\n")  # needs p/__init__'s names
    assert imported_modules("p.mod", source, modules) == {"p"}


def test_the_graph_sees_real_edges():
    graph = import_graph()
    assert "protege.capabilities" in graph["protege.run"]
    assert "protege.actors.vllm_engine" in graph["protege.actors.vllm_sampler"]


def test_protege_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_protege_has_no_import_cycle_through_lazy_imports_either():
    """A cycle closed by a function-level import works, but only by import order (the
    backends <-> vllm_sampler one did); the module map should be a tree of layers."""
    cycle = find_cycle(import_graph(lazy=True))
    assert cycle is None, "import cycle (counting imports inside functions): " + " -> ".join(cycle)


def test_capabilities_imports_only_the_standard_library():
    tree = ast.parse((PACKAGE / "capabilities.py").read_text())
    names = {
        alias.name if isinstance(node, ast.Import) else node.module
        for node in _module_level_imports(tree)
        for alias in getattr(node, "names", [])
    }
    assert all(n.split(".")[0] in sys.stdlib_module_names for n in names), names


@pytest.mark.parametrize(
    "statement",
    [
        "import protege.run, protege.controller, protege.pipeline, protege.launch, protege.actors.ray_actors",
        # the driver names the worker classes (Ray wraps them there) for either backend
        (
            "from protege.actors.backends import sampler_class, teacher_class; "
            "[f(b) for f in (sampler_class, teacher_class) for b in ('hf', 'vllm')]"
        ),
    ],
)
def test_driver_imports_neither_deepspeed_nor_vllm(statement):
    code = (
        f"{statement}; import sys; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'vllm')))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
