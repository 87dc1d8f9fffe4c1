"""The import graph of recsys_pretrain/ and flows/, read from the source with `ast` (nothing is imported):
no cycles, no import of an internal module that does not exist, and layers that only point down.

Every import counts, at the top of a module or inside a function (a function-level import closes a cycle
just as well, only later); imports under `if TYPE_CHECKING:` do not run and are left out. An edge goes to
the module named: `from a.b import c` is an edge to `a.b.c` when that is a module, else to `a.b` (and `c`
must then be a name `a.b` binds). Parent packages are not added as edges.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("recsys_pretrain", "flows")

# Layers (see ../shared/design/ARCHITECTURE.md): tracking and the registry never import a stage; serving
# never imports training.
STAGES = ("recsys_pretrain.train", "recsys_pretrain.data", "recsys_pretrain.models", "recsys_pretrain.recommend",
          "recsys_pretrain.serve", "recsys_pretrain.index")
NO_STAGES = ("recsys_pretrain.tracking", "recsys_pretrain.registry")
NO_TRAINING = ("recsys_pretrain.recommend", "recsys_pretrain.serve", "recsys_pretrain.pyfunc")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the module imported (resolved, absolute)
    name: str | None  # for `from target import name` when `name` is not itself a module
    line: int


def find_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages (a package is its __init__.py)."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """Every node under `node` except the bodies of `if TYPE_CHECKING:` (their `else` still runs)."""
    for child in ast.iter_child_nodes(node):
        if _is_type_checking(child):
            for sub in child.orelse:
                yield sub
                yield from _walk(sub)
            continue
        yield child
        yield from _walk(child)


def _top_level_names(tree: ast.Module) -> set[str] | None:
    """Names a module binds at import time (None: it cannot be known, e.g. `import *` or `__getattr__`)."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> bool:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if node.name == "__getattr__":
                    return False
                names.add(node.name)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                for alias in node.names:
                    if alias.name == "*":
                        return False
                    names.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign | ast.For | ast.With):
                targets = node.targets if isinstance(node, ast.Assign) else (
                    [item.optional_vars for item in node.items if item.optional_vars] if isinstance(node, ast.With)
                    else [node.target])
                for target in targets:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            if isinstance(node, ast.If | ast.Try | ast.For | ast.While | ast.With):
                blocks = [getattr(node, f, []) for f in ("body", "orelse", "finalbody")]
                blocks += [h.body for h in getattr(node, "handlers", [])]
                if not all(visit(b) for b in blocks):
                    return False
        return True

    return names if visit(tree.body) else None


@dataclass
class Graph:
    root: Path
    modules: dict[str, Path]
    imports: list[Import]  # internal imports, resolved
    external: dict[str, set[str]]  # module -> top-level names of the non-project packages it imports
    absent: list[str]  # internal imports that name no module (or a name the module does not bind)

    def edges(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {m: set() for m in self.modules}
        for imp in self.imports:
            if imp.target in self.modules:
                out[imp.source].add(imp.target)
        return out


def build_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> Graph:
    modules = find_modules(root, packages)
    trees = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in modules.items()}
    bound = {name: _top_level_names(tree) for name, tree in trees.items()}

    def internal(name: str) -> bool:
        return name.split(".")[0] in packages

    imports: list[Import] = []
    external: dict[str, set[str]] = {name: set() for name in modules}
    absent: list[str] = []
    for name, tree in trees.items():
        is_pkg = modules[name].name == "__init__.py"
        where = modules[name].relative_to(root).as_posix()
        for node in _walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if not internal(alias.name):
                        external[name].add(alias.name.split(".")[0])
                    elif alias.name in modules:
                        imports.append(Import(name, alias.name, None, node.lineno))
                    else:
                        absent.append(f"{where}:{node.lineno}: import {alias.name}: no such module")
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: up from this module's package
                    package = name.split(".") if is_pkg else name.split(".")[:-1]
                    if node.level - 1 > len(package) - 1:
                        absent.append(f"{where}:{node.lineno}: relative import beyond the top-level package")
                        continue
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if not internal(base):
                    external[name].add(base.split(".")[0])
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        imports.append(Import(name, sub, None, node.lineno))
                    elif base not in modules:
                        absent.append(f"{where}:{node.lineno}: from {base} import {alias.name}: no module {base}")
                    elif alias.name != "*" and bound[base] is not None and alias.name not in bound[base]:
                        absent.append(f"{where}:{node.lineno}: from {base} import {alias.name}: {base} has no "
                                      f"module or name {alias.name}")
                    else:
                        imports.append(Import(name, base, alias.name, node.lineno))
    return Graph(root, modules, imports, external, absent)


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, each sorted; only those that hold a cycle (two or more
    modules, or one that imports itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
            if len(comp) > 1 or v in edges.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def a_cycle(edges: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete cycle inside a strongly connected component: [m0, m1, ..., m0] (breadth first)."""
    members, start = set(component), component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:  # back to the start: walk the parents from v to it
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {component}")


def describe_cycle(graph: Graph, cycle: list[str]) -> str:
    lines = []
    for a, b in zip(cycle, cycle[1:], strict=False):
        imp = min((i for i in graph.imports if i.source == a and i.target == b), key=lambda i: i.line)
        lines.append(f"  {a} -> {b}   ({graph.modules[a].relative_to(graph.root).as_posix()}:{imp.line})")
    return "\n".join(lines)


def reachable(edges: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module `start` imports, directly or not -> the module that imports it (for the path back)."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        v = todo.pop()
        for w in sorted(edges.get(v, ())):
            if w not in seen and w != start:
                seen[w] = v
                todo.append(w)
    return seen


def path_to(seen: dict[str, str], start: str, end: str) -> str:
    path = [end]
    while path[-1] != start:
        path.append(seen[path[-1]])
    return " -> ".join(reversed(path))


def under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph()


# ---- the project ------------------------------------------------------------------------------------------------
def test_every_internal_import_names_a_module_that_exists(graph):
    assert graph.modules, "no modules found"
    assert not graph.absent, "imports of internal modules or names that do not exist:\n" + "\n".join(graph.absent)


def test_no_import_cycles(graph):
    edges = graph.edges()
    cycles = [describe_cycle(graph, a_cycle(edges, comp)) for comp in strongly_connected(edges)]
    assert not cycles, "import cycles (each listed with the import that makes every step):\n" + "\n\n".join(cycles)


@pytest.mark.parametrize("module", NO_STAGES)
def test_tracking_and_registry_import_no_stage(graph, module):
    assert module in graph.modules
    seen = reachable(graph.edges(), module)
    bad = [path_to(seen, module, m) for m in sorted(seen) if under(m, STAGES)]
    assert not bad, f"{module} imports a stage (directly or through the chain shown):\n" + "\n".join(bad)


@pytest.mark.parametrize("module", NO_TRAINING)
def test_serving_imports_no_training(graph, module):
    assert module in graph.modules
    seen = reachable(graph.edges(), module)
    bad = [path_to(seen, module, m) for m in sorted(seen) if under(m, ("recsys_pretrain.train",))]
    assert not bad, f"{module} imports training (directly or through the chain shown):\n" + "\n".join(bad)


def test_the_library_knows_nothing_of_prefect(graph):
    bad = sorted(m for m, ext in graph.external.items() if m.startswith("recsys_pretrain") and "prefect" in ext)
    assert not bad, f"these library modules import prefect (orchestration belongs in flows/): {bad}"


# ---- the checker itself, on a made-up package --------------------------------------------------------------------
def _package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_function_level_and_relative_cycles_and_absent_modules(tmp_path):
    _package(tmp_path, {
        "flows/__init__.py": "",
        "recsys_pretrain/__init__.py": "",
        "recsys_pretrain/a.py": "from recsys_pretrain import b\nX = 1\n",
        "recsys_pretrain/b.py": "def f():\n    from .sub.c import Y\n    return Y\n",
        "recsys_pretrain/sub/__init__.py": "from . import c\n",
        "recsys_pretrain/sub/c.py": "from ..a import X\nfrom .. import a\nY = 2\n",
        "recsys_pretrain/d.py": "import recsys_pretrain.gone\nfrom recsys_pretrain.a import nothing\n"
                                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import recsys_pretrain.e\n",
        "recsys_pretrain/e.py": "import recsys_pretrain.d\nimport prefect\n",
    })
    g = build_graph(tmp_path)
    edges = g.edges()
    assert edges["recsys_pretrain.b"] == {"recsys_pretrain.sub.c"}  # function level, relative, resolved
    assert edges["recsys_pretrain.sub"] == {"recsys_pretrain.sub.c"}
    assert edges["recsys_pretrain.sub.c"] == {"recsys_pretrain.a"}
    assert edges["recsys_pretrain.d"] == set()  # TYPE_CHECKING imports do not run
    comps = strongly_connected(edges)
    assert comps == [["recsys_pretrain.a", "recsys_pretrain.b", "recsys_pretrain.sub.c"]]
    cycle = a_cycle(edges, comps[0])
    assert cycle[0] == cycle[-1] and len(cycle) == 4
    assert "recsys_pretrain.a -> recsys_pretrain.b" in describe_cycle(g, cycle)
    assert len(g.absent) == 2 and "recsys_pretrain.gone" in g.absent[0] and "nothing" in g.absent[1]
    assert "prefect" in g.external["recsys_pretrain.e"]
    seen = reachable(edges, "recsys_pretrain.b")
    assert path_to(seen, "recsys_pretrain.b", "recsys_pretrain.a") == ("recsys_pretrain.b -> recsys_pretrain.sub.c"
                                                                        " -> recsys_pretrain.a")
    assert strongly_connected({"m": {"m"}}) == [["m"]] and a_cycle({"m": {"m"}}, ["m"]) == ["m", "m"]
