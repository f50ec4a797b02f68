"""Package layout rules (issue #14, "Layout"): modules of one job each, and no import circles.

Both checks read the source with `ast` only; nothing is imported, so this file runs in milliseconds.

- Every `.py` file under `mobiledistill/` has at most `MAX_LINES` lines.
- The graph of imports between `mobiledistill.*` modules has no cycle. Every `import` / `from ... import` statement
  counts, wherever it stands (module level, inside a function, under `if TYPE_CHECKING:`), because a lazy import that
  closes a circle still ties the two modules together. Edges:
  `import a.b.c` -> `a.b.c`; `from a.b import c` -> `a.b.c` when `c` is a submodule, else `a.b`; relative imports are
  resolved against the importing module's package. A package's `__init__` importing its own submodules is an ordinary
  edge (pkg -> pkg.sub) and so is no circle by itself; a submodule that imports names from its parent package (which
  re-exports them) closes a circle, so submodules import their siblings directly.
"""

import ast
import pathlib

PACKAGE = "mobiledistill"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE
MAX_LINES = 450


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(path: pathlib.Path) -> bool:
    return path.name == "__init__.py"


def _resolve(name: str, modules: dict[str, pathlib.Path]) -> str | None:
    """The longest known module that `name` (a dotted module path) names or lies inside."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _imports(module: str, is_package: bool, source: str, modules: dict[str, pathlib.Path]) -> set[str]:
    """The `mobiledistill.*` modules that `module` imports, anywhere in its source."""
    tree = ast.parse(source, filename=module)
    package = module if is_package else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    target = _resolve(alias.name, modules)
                    if target:
                        targets.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not (source == PACKAGE or source.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                target = submodule if submodule in modules else _resolve(source, modules)
                if target:
                    targets.add(target)
    targets.discard(module)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, _is_package(path), path.read_text(), modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [m0, m1, ..., m0], or None. Iterative DFS with white/grey/black colouring."""
    colour = dict.fromkeys(graph, 0)
    for start in sorted(graph):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child, 2) == 1:
                return path[path.index(child):] + [child]
            elif colour.get(child) == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_graph_sees_lazy_and_relative_imports():
    """The parser counts function-level and relative imports (guards the check itself)."""
    modules = {"mobiledistill": ROOT / "__init__.py", "mobiledistill.a": ROOT / "a.py",
               "mobiledistill.pkg": ROOT / "pkg" / "__init__.py", "mobiledistill.pkg.b": ROOT / "pkg" / "b.py"}
    source = (
        "def f():\n    from mobiledistill import a\n"
        "def g():\n    from . import b\n    from ..a import x\n    import mobiledistill.pkg.b as bb\n"
    )
    assert _imports("mobiledistill.pkg.c", False, source, modules) == {"mobiledistill.a", "mobiledistill.pkg.b"}
    init = "from . import b\nfrom .b import y\n"
    assert _imports("mobiledistill.pkg", True, init, modules) == {"mobiledistill.pkg.b"}
    parent = "from mobiledistill.pkg import name\n"  # a name that the package re-exports: an edge to the package
    assert _imports("mobiledistill.pkg.b", False, parent, modules) == {"mobiledistill.pkg"}
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == ["x", "y", "z", "x"]
    assert find_cycle({"pkg": {"pkg.sub"}, "pkg.sub": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_modules_are_short():
    long = {str(p.relative_to(ROOT.parent)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them into modules of one job each): {long}"
