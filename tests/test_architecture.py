"""The package's shape: no import cycles between its modules, deferred imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import laion_search

PKG = Path(laion_search.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (imports for type checkers never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its text (top level or inside a
    function), absolute or relative; ``if TYPE_CHECKING:`` blocks aside."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets.append(base)
                targets += [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert "laion_search.store" in graph and graph["laion_search.index"], "the walk found the package"
    assert cycles(graph) == []


def test_the_cycle_check_sees_deferred_and_relative_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    real = import_graph()
    # store.connect opens a chDB backend: a top-level import; cli/main imports the store inside
    # its commands (deferred): both must be in the graph
    assert "laion_search.backends.chdb" in real["laion_search.backends"]
    assert "laion_search.store" in real["laion_search.cli.main"]
    # the package's names load on first use: its __init__ imports only the errors at run time
    assert real["laion_search"] == {"laion_search.errors"}


def test_schema_names_live_in_one_module():
    """Table names and DDL are defined in laion_search.schema only."""
    for path in PKG.rglob("*.py"):
        if path.name == "schema.py":
            continue
        text = path.read_text(encoding="utf-8")
        for needle in ('TABLE = "laion"', "CREATE TABLE IF NOT EXISTS {table}", 'SCAN_SUFFIX = "', "WHERE_TYPES = {"):
            assert needle not in text, f"{path.relative_to(PKG)} defines {needle!r}"
