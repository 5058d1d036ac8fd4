"""The import graph of gptoss/, read from the sources with ast: no import circle anywhere, and the weights
layer imports nothing above it.

Every import statement counts, those inside functions too: a lazy import runs later, but it still ties
the two modules together (a factory beside the interface it dispatches over is how circles begin).
Importing gptoss.p.m from outside package gptoss.p also runs gptoss/p/__init__.py, so that is an arrow
to gptoss.p as well; from inside gptoss.p it is not (the package is already being imported).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gptoss"
Graph = dict[str, dict[str, int]]  # module -> {module it imports: line of the first such import}


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted name -> source file of every module of the package (a package's name is its __init__.py's)."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def executed(target: str, importer: str, known: set[str], root: str) -> list[str]:
    """The package's modules whose code runs when `importer` imports `target` (a module, or a name in one)."""
    if not inside(target, root):
        return []
    while target not in known:  # gptoss.m.name -> gptoss.m
        target = target.rpartition(".")[0]
    run = [target]
    parent = target.rpartition(".")[0]
    while parent and not inside(importer, parent):
        run.append(parent)
        parent = parent.rpartition(".")[0]
    return run


def import_graph(package_dir: Path = PACKAGE) -> Graph:
    known_paths = module_names(package_dir)
    known, root = set(known_paths), package_dir.name
    graph: Graph = {}
    for name, path in known_paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph[name] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # from . / .. / ...x import y
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module
                # `from P import x` imports the submodule P.x where there is one, else a name P defines
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            else:
                continue
            for target in targets:
                for module in executed(target, name, known, root):
                    if module != name:
                        edges.setdefault(module, node.lineno)
    return graph


def circles(graph: Graph) -> list[list[str]]:
    """One circle (a list of modules, the first repeated at the end) per strongly connected component of
    more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for component in components:  # the shortest way from the component's first module back to itself
        start = min(component)
        paths = {start: [start]}
        frontier = [start]
        while frontier and start not in [w for v in frontier for w in graph[v]]:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in component and w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        found.append(paths[last] + [start])
    return sorted(found)


def describe(circle: list[str], graph: Graph, package_dir: Path = PACKAGE) -> str:
    paths = module_names(package_dir)
    steps = [circle[0]]
    for a, b in zip(circle, circle[1:]):
        steps.append(f"{b} ({paths[a].relative_to(package_dir.parent)}:{graph[a][b]})")
    return " -> ".join(steps)


# Circles known and being removed elsewhere, each with the work that removes it; the test fails when a
# circle not listed appears, and when a listed one is gone (then delete its line).
KNOWN_CIRCLES: list = []


def test_no_import_circle_in_gptoss():
    graph = import_graph()
    found = circles(graph)
    new = [describe(c, graph) for c in found if set(c) not in KNOWN_CIRCLES]
    assert not new, ("import circles in gptoss/ (after each arrow: the module imported, and the file and line "
                     "that import it):\n  " + "\n  ".join(new))
    gone = [sorted(known) for known in KNOWN_CIRCLES if known not in [set(c) for c in found]]
    assert not gone, f"no longer a circle, delete from KNOWN_CIRCLES: {gone}"


def test_the_graph_sees_every_kind_of_import():
    """The reader finds what the real sources hold: relative imports of modules and of names, and the arrow
    to a package's __init__ from outside it."""
    graph = import_graph()
    assert "gptoss.weights.base" in graph["gptoss.weights.binfile"]  # from .base import ...
    assert "gptoss.config" in graph["gptoss.weights.base"]  # from ..config import ...
    assert "gptoss.weights.bf16" in graph["gptoss.reference"]  # from .weights.bf16 import ...
    assert "gptoss.weights" in graph["gptoss.reference"]  # ... which runs gptoss/weights/__init__.py first
    assert "gptoss.weights" not in graph["gptoss.weights.binfile"]  # inside the package: no such arrow


def test_a_circle_is_found_and_named(tmp_path):
    """A made-up package with one circle through a function-level import, and a package __init__ that imports
    its own module (which is no circle)."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("import os\n\n\ndef later():\n    from .sub.c import thing\n    return thing\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import thing\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\n\nthing = 1\n")
    graph = import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.sub.c": 5, "pkg.sub": 5}
    assert circles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]  # the shortest way round
    assert describe(circles(graph)[0], graph, pkg) == \
        "pkg.a -> pkg.b (pkg/a.py:1) -> pkg.sub.c (pkg/b.py:5) -> pkg.a (pkg/sub/c.py:1)"
    (pkg / "b.py").write_text("import os\n")
    assert circles(import_graph(pkg)) == []


def test_weights_import_nothing_above_them():
    """gptoss.weights sits at the bottom (beside config and errors); its readers import the interface
    (base.py), which imports no reader; no module of the package imports its dispatcher (__init__.py)."""
    graph = import_graph()
    weights = {m: targets for m, targets in graph.items() if inside(m, "gptoss.weights")}
    assert {"gptoss.weights.base", "gptoss.weights.safetensors", "gptoss.weights.binfile",
            "gptoss.weights.synthetic"} <= set(weights)
    for module, targets in weights.items():
        above = [t for t in targets if not inside(t, "gptoss.weights") and t not in ("gptoss.config", "gptoss.errors")]
        assert not above, f"{module} imports {above}"
        if module != "gptoss.weights":
            assert "gptoss.weights" not in targets, f"{module} imports the dispatcher"
    readers = {"gptoss.weights.safetensors", "gptoss.weights.binfile", "gptoss.weights.synthetic"}
    for reader in readers:
        assert "gptoss.weights.base" in weights[reader]
    assert not set(weights["gptoss.weights.base"]) & readers
