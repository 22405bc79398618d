"""The package's shape, checked: no import cycle (imports inside functions included), small modules, one
definition of the task names, and the doctests of nakt/ run (`make test` passes ``--doctest-modules``)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nakt"
MAX_MODULE_LINES = 400


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of nakt/ (a package is its ``__init__``)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the nakt modules it imports anywhere in its file (top level, functions, TYPE_CHECKING blocks).

    ``from nakt.io import labelset`` is an edge to ``nakt.io.labelset`` (a module); ``from nakt.models import
    load`` one to ``nakt.models`` (the package's ``__init__``)."""

    def owner(name: str) -> str:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                graph[name] |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "nakt"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: climb from this module's package
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                if base.split(".")[0] != "nakt":
                    continue
                graph[name] |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else owner(base) for a in node.names}
        graph[name].discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path, monkeypatch):
    """The check itself can fail: two modules that import each other, one of them inside a function."""
    package = tmp_path / "nakt"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from nakt.b import g\n")
    (package / "b.py").write_text("def g():\n    from nakt import a\n")
    (package / "c.py").write_text("import nakt.a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    assert cycles(import_graph(modules())) == [["nakt.a", "nakt.b"]]


def test_nakt_has_no_import_cycle():
    found = cycles(import_graph(modules()))
    assert not found, f"import cycles among nakt modules: {found}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_stay_small(name):
    lines = len(modules()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines (split it: at most {MAX_MODULE_LINES})"


def test_task_names_are_defined_once():
    """``("segmentation", "classification")`` lives in nakt.models.card.TASKS; everything else refers to it."""
    spelled = [name for name, path in modules().items()
               if '"segmentation", "classification"' in path.read_text(encoding="utf-8")]
    assert spelled == ["nakt.models.card"]


def test_nakt_modules_import_each_other_at_the_top():
    """Imports of nakt modules sit at module level, where the import graph above sees every dependency at a glance
    (an import inside a function is how the cycles this file forbids used to hide). Optional third-party packages
    (nnunetv2, onnxruntime, ...) are still imported inside the functions that need them."""
    inside = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                module = node.module if isinstance(node, ast.ImportFrom) else None
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [module or ""]
                if isinstance(node, (ast.Import, ast.ImportFrom)) and any(n.split(".")[0] == "nakt" for n in names):
                    inside.append(f"{name}.{function.name}")
    assert not inside, f"nakt imports inside functions: {sorted(set(inside))}"
