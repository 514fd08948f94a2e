"""The package's shape: no import cycles between its modules, deferred (function-local) and
``if TYPE_CHECKING:`` imports included — a cycle that only type checkers or a late call walk today
is one edit away from an ImportError, and it tangles the layers all the same."""

from __future__ import annotations

import ast
from pathlib import Path

import laion_search

PKG = Path(laion_search.__file__).parent


def _modules(pkg: Path = PKG) -> dict[str, Path]:
    out = {}
    for f in pkg.rglob("*.py"):
        parts = f.relative_to(pkg.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _nodes(tree: ast.AST, type_checking: bool):
    """Every node, or (``type_checking=False``) every node but those under ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not type_checking and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def import_graph(pkg: Path = PKG, *, type_checking: bool = True) -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its text: top level, inside a function,
    under ``if TYPE_CHECKING:`` (unless ``type_checking=False``), absolute or relative.

    ``from P import m`` where ``P.m`` is a module is an edge to ``P.m`` only: a package's
    ``__init__`` runs before any of its submodules whichever way they are imported, so an edge to
    it would be one every submodule has. ``from P import name`` (not a module) is an edge to ``P``."""
    mods = _modules(pkg)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _nodes(ast.parse(path.read_text(encoding="utf-8")), type_checking):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in mods else base)
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
    assert cycles(graph) == [], "import cycles (deferred and TYPE_CHECKING imports included)"


def test_the_cycle_check_sees_deferred_and_relative_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    real = import_graph()
    # store.connect opens a chDB backend: a top-level import; cli/main imports the store inside
    # its commands (deferred): both must be in the graph
    assert "laion_search.backends.chdb" in real["laion_search.backends"]
    assert "laion_search.store" in real["laion_search.cli.main"]
    # shards names Input only for type checkers; remote falls back to the per-file fetcher in a function
    assert "laion_search.sources.inputs" in real["laion_search.sources.shards"]
    assert "laion_search.sources.fetch" in real["laion_search.sources.remote"]
    # `from laion_search import killpoints` is an edge to the submodule, not to the package's __init__
    assert "laion_search.killpoints" in real["laion_search.store"] and "laion_search" not in real["laion_search.store"]
    # the package's names load on first use: its __init__ imports only the errors at run time,
    # the rest for type checkers
    assert import_graph(type_checking=False)["laion_search"] == {"laion_search.errors"}
    assert {"laion_search.api", "laion_search.store"} <= real["laion_search"]


def test_the_cycle_check_counts_type_checking_and_function_imports(tmp_path):
    """A cycle closed only by a function-local import and an ``if TYPE_CHECKING:`` import is found;
    ``from pkg import submodule`` does not make every module depend on ``pkg/__init__``."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    files = {
        "__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\n",
        "a.py": "from pkg import b\nclass A: ...\n",
        "b.py": "def f():\n    from .c import C\n    return C\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\nclass C: ...\n",
        "d.py": "import pkg.c\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}, "pkg.d": {"pkg.c"}}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert cycles(import_graph(pkg, type_checking=False)) == []


def test_schema_names_live_in_one_module():
    """Table names and DDL are defined in laion_search.schema only."""
    for path in PKG.rglob("*.py"):
        if path.name == "schema.py":
            continue
        text = path.read_text(encoding="utf-8")
        for needle in ('TABLE = "laion"', "CREATE TABLE IF NOT EXISTS {table}", 'SCAN_SUFFIX = "', "WHERE_TYPES = {"):
            assert needle not in text, f"{path.relative_to(PKG)} defines {needle!r}"


def test_code_map_names_every_module():
    """docs/architecture.md's code map names every module of the package (a subpackage's empty
    ``__init__.py`` excepted) and no module that is gone."""
    import re

    root = Path(__file__).resolve().parents[1]
    pkg = root / "src" / "laion_search"
    text = (root / "docs" / "architecture.md").read_text()
    table = "\n".join(line for line in text.splitlines() if line.startswith("| `"))
    named = set()
    for cell in re.findall(r"^\| (.+?) \|", table, re.M):
        for path in re.findall(r"`([a-z0-9_/]+\.py)`", cell):
            named.add(path)
    modules = {str(p.relative_to(pkg)) for p in pkg.rglob("*.py")}
    trivial = {m for m in modules if m.endswith("/__init__.py") and len((pkg / m).read_text().strip().splitlines()) <= 3}
    # bench/ is one row listing its modules by file name
    bench_row = next((c for c in re.findall(r"^\| `bench/` \| (.+?) \|$", table, re.M)), "")
    named |= {f"bench/{n}" for n in re.findall(r"`([a-z0-9_]+\.py)`", bench_row)}
    missing = sorted(modules - trivial - named)
    stale = sorted(n for n in named if n not in modules)
    assert missing == [], f"docs/architecture.md's code map lacks {missing}"
    assert stale == [], f"docs/architecture.md's code map names modules that do not exist: {stale}"


def test_every_public_error_is_exported():
    import inspect

    from laion_search import errors

    public = {n for n, obj in vars(errors).items()
              if inspect.isclass(obj) and issubclass(obj, errors.LaionError) and not n.startswith("_")}
    assert public <= set(laion_search.__all__), sorted(public - set(laion_search.__all__))
    assert all(getattr(laion_search, n) is getattr(errors, n) for n in public)


def test_only_the_store_talks_to_the_engine():
    """No module outside ``store.py`` and ``backends/`` reaches the backend (``x.backend``, a
    backend class constructed, its private session pool): every statement goes through the Store,
    which clears its own caches after each change it makes."""
    offenders = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "backends" or rel.name == "store.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("backend", "_acquire", "_release"):
                offenders.append(f"{rel}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                    "ChdbBackend", "ClickHouseBackend"):
                offenders.append(f"{rel}:{node.lineno} {node.func.id}(…)")
    assert offenders == [], offenders


def test_the_engine_is_asked_one_way():
    """Which engine a store runs on is ``store.embedded`` / ``store.engine``, never a name compared
    or an attribute probed with getattr."""
    for path in PKG.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for needle in ('name == "chdb"', 'name != "chdb"', 'getattr(store.backend', '"embedded", False'):
            assert needle not in text, f"{path.relative_to(PKG)} asks which engine with {needle!r}"


#: the longest a function outside tests may be, in lines (def to its last line, decorators not counted)
MAX_FUNCTION_LINES = 120


def _long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (n lines)`` for every function or method under ``root`` longer than ``limit``
    lines, nested ones included (a closure counts inside its parent too)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_longer_than_the_limit():
    """No function of the package (scripts/ too) is over 120 lines: a long one is split into named
    helpers, so that each does one thing a reader can hold."""
    root = Path(__file__).resolve().parents[1]
    long = _long_functions(PKG) + _long_functions(root / "scripts")
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_length_check_sees_methods_closures_and_async(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(
        f"def short():\n    pass\n\n\ndef long():\n{body}\n\n\n"
        f"class C:\n    async def method(self):\n{body.replace('    ', '        ')}\n\n\n"
        f"def outer():\n    def inner():\n{body.replace('    ', '        ')}\n    return inner\n")
    found = _long_functions(tmp_path)
    assert sorted(f.split(" ")[1] for f in found) == ["inner", "long", "method", "outer"], found
    assert _long_functions(tmp_path, limit=10_000) == []
