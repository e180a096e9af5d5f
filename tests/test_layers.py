"""The import graph: `croco/` (the library) has no import cycle and never imports Prefect;
every package that croco, its flows, tasks and workers import is declared in
pyproject.toml. Imports inside functions count: a cycle held together by a function-local
import is still a cycle."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("croco", "flows", "tasks", "workers")


def _module_name(path: Path) -> str:
    """A file's module name as installed: `flows/cli.py` is `croco.flows.cli`."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] != "croco":
        parts.insert(0, "croco")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = [p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")
             if not any(part.startswith(".") for part in p.parts)]
    return {_module_name(p): p for p in files}


def _imported(name: str, path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it, as absolute dotted names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    """Module -> the croco modules it imports (a name that is an attribute of a module
    counts as that module)."""
    sources = _sources()
    graph = {}
    for name, path in sources.items():
        edges = set()
        for m in _imported(name, path):
            while m and m not in sources:
                m = m.rpartition(".")[0]
            if m and m != name and m != "croco":
                edges.add(m)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_circle_of_three():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_library_has_no_import_cycle():
    library = {k: {w for w in v if not w.startswith(("croco.flows", "croco.tasks",
                                                     "croco.workers"))}
               for k, v in _graph().items()
               if not k.startswith(("croco.flows", "croco.tasks", "croco.workers"))}
    assert "croco.models" in library and "croco.config" in library
    assert _cycles(library) == []


def test_the_arrows_only_point_down():
    """croco/ imports neither Prefect nor the flows, tasks or workers above it; tasks/ does
    not import flows/."""
    sources = _sources()
    for name, path in sources.items():
        imported = _imported(name, path)
        if not name.startswith(("croco.flows", "croco.tasks", "croco.workers")):
            assert not {m for m in imported if m.split(".")[0] == "prefect"}, name
            assert not {m for m in imported if m.startswith(("croco.flows", "croco.tasks",
                                                             "croco.workers"))}, name
        if name.startswith("croco.tasks"):
            assert not {m for m in imported if m.startswith("croco.flows")}, name


def _normalized(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def test_every_imported_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra]
    declared = {_normalized(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in requirements}
    providers = importlib.metadata.packages_distributions()
    undeclared = {}
    for name, path in _sources().items():
        for m in _imported(name, path):
            top = m.split(".")[0]
            if top in sys.stdlib_module_names or top in ("croco", "__future__"):
                continue
            dists = providers.get(top) or [top]  # not installed here: its own name
            if not declared & {_normalized(d) for d in dists}:
                undeclared.setdefault(top, set()).add(name)
    assert undeclared == {}
