"""No two fastkd modules import each other, directly or through others; no module over 400 lines.

A circle at module level makes the result depend on which module is imported first (a
half-initialised module hands out missing names); a circle through a function-level import
hides the same tangle until that function runs. So every `import` statement counts, wherever it
stands, except those under `if TYPE_CHECKING:` (never run), and the graph must be acyclic.
preprocess/ and kernels/ install as fastkd.preprocess and fastkd.kernels, so they are walked too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from source_walk import REPO, SOURCE_FOLDERS, parse_files, source_files

PACKAGE = REPO / "fastkd"
MAX_LINES = 400


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    if root == PACKAGE:  # preprocess/x.py is fastkd.preprocess.x
        parts = (*SOURCE_FOLDERS[parts[0]].split("."), *parts[1:])
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module):
    """Every import node of the module, in functions too, except under `if TYPE_CHECKING:`."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the fastkd modules it imports. `from pkg import name` counts
    as importing pkg.name when that is a module, else pkg. The top package itself is left out:
    Python runs fastkd/__init__.py before any submodule, modules reach it only for
    `__version__`, and its lazy `fastkd.fit` / `fastkd.Trainer` getters are the public entry."""
    files = source_files() if root == PACKAGE else sorted(root.rglob("*.py"))
    modules = {module_name(p, root): p for p in files}
    top = root.name
    trees = parse_files(list(modules.values()))
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in _imports(trees[path]):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the module's package upwards
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            deps.update(t for t in targets if t in modules and t != top and t != name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle as [a, b, ..., a], or None (depth-first search, colouring the nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_between_fastkd_modules():
    graph = import_graph()
    assert "fastkd.preprocess.pack" in graph and "fastkd.kernels.op" in graph  # all three folders walked
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_module_over_400_lines():
    """A module that outgrows one screenful of jobs is split by job, not allowed to sprawl."""
    long = {path.relative_to(REPO).as_posix(): n for path in source_files()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_a_circle_is_found(tmp_path):
    """The check can fail: two modules importing each other are named."""
    pkg = tmp_path / "fastkd"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from fastkd.b import g  # lazy, still one half of a circle\n    return g\n")
    (pkg / "b.py").write_text("import fastkd.a\n\ndef g():\n    return 1\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import fastkd.a\n")
    graph = import_graph(pkg)
    assert graph["fastkd.c"] == set()  # type-checking imports never run
    assert find_cycle(graph) == ["fastkd.a", "fastkd.b", "fastkd.a"]
