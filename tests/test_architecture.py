"""The import structure: no module cycles, and imports flow one way between the packages.

Every import statement of every module in engine/, kernels/, index/ and jobs/ counts, those inside
functions included (a function-level import still ties the two modules together; it only moves the
failure from import time to call time). The packages are layered as the code has them (ARCHITECTURE.md):

    kernels   imports nothing of the project
    index     imports nothing of the project (the embedders, the store, search, file plumbing)
    engine    may import kernels and index (the per-step search, the embedder, the index store)
    jobs      may import engine, index and kernels

and nothing imports jobs. benchmarks/ and tests/ sit on top and are not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels", "index", "jobs")
ALLOWED: dict[str, set[str]] = {
    "kernels": set(),
    "index": set(),
    "engine": {"kernels", "index"},
    "jobs": {"engine", "index", "kernels"},
}

# Module imports that close a cycle known today, left out of the cycle check until fixed.


def module_name(path: Path) -> str:
    parts = ["amg_engine", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Module name -> file, for every .py file under the four packages."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module an ImportFrom names, relative imports resolved against ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports anywhere in its file (function bodies included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, module, path.name == "__init__.py")
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` imports mod
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # ``import a.b.c`` of a name inside a module: its module
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None when it is acyclic (iterative DFS)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def package(module: str) -> str:
    return module.split(".")[1]


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "amg_engine.index.store" in graph["amg_engine.engine.engine"]  # imported inside Engine.__init__
    assert "amg_engine.kernels.nn_search" in graph["amg_engine.engine.guidance"]  # inside search_fn
    # ``from ._dispatch import ...``
    assert "amg_engine.kernels._dispatch" in graph["amg_engine.kernels.guidance"]


def test_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_package_layering_is_acyclic():
    cycle = find_cycle(ALLOWED)
    assert cycle is None, "the allowed package directions form a cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("pkg", PACKAGES)
def test_imports_flow_one_way_between_packages(pkg):
    wrong = sorted(
        f"{m} imports {d}"
        for m, deps in import_graph().items()
        if package(m) == pkg
        for d in deps
        if package(d) != pkg and package(d) not in ALLOWED[pkg]
    )
    allowed = " and ".join(sorted(ALLOWED[pkg])) or "nothing of the project"
    assert not wrong, f"{pkg} may import {allowed} (see ALLOWED): {wrong}"
