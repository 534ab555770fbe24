"""The project's own import graph, read from the source with `ast` (imports inside functions count too):
what the architecture tests and the dvc.yaml dependency test check."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

PACKAGES = ("lightning_modules", "pipeline")


def module_files(root: Path) -> Dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _resolve(name: str, modules: Dict[str, Path]) -> str | None:
    """`pipeline.data.sources.load_source` -> `pipeline.data.sources`: the longest prefix that is a module."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports(root: Path) -> Dict[str, Set[str]]:
    """Module -> the project modules it imports (`from pkg import sub` counts `pkg.sub` when that is a module)."""
    modules = module_files(root)
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        deps: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    target = _resolve(f"{node.module}.{alias.name}", modules)
                    if target:
                        deps.add(target)
            elif isinstance(node, ast.Import):
                deps.update(t for a in node.names if (t := _resolve(a.name, modules)))
        graph[name] = {d for d in deps if d != name}
    return graph


def parents(name: str) -> Set[str]:
    """Importing `a.b.c` runs `a/__init__` and `a/b/__init__` first."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def closure(graph: Dict[str, Set[str]], start: str) -> Set[str]:
    """Every project module that importing `start` runs (its packages' __init__ included)."""
    seen: Set[str] = set()
    todo = [start]
    while todo:
        m = todo.pop()
        if m in seen or m not in graph:
            continue
        seen.add(m)
        todo.extend(graph[m] | parents(m))
    return seen


def cycles(graph: Dict[str, Set[str]]) -> list:
    """Import cycles, each as a list of modules (a package importing its own submodules is not one)."""
    found, state = [], {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d.startswith(m + ".") or m.startswith(d + "."):
                continue
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return found
