"""The embedded corpus: the running Python's own documentation, ~2 MB of English prose on every machine.

Documents, in a fixed order: one per standard-library module (its module, class and function docstrings in source
order), one per compiled-in builtin module, then one per `pydoc_data.topics` topic (the language reference).
Modules are found with `pkgutil.iter_modules` over the stdlib directory and read with `ast`, never imported: no
module code runs, so GUI toolkits, `antigravity` or `this` cannot have side effects and no import can fail. Only
builtin (C) modules, which run no Python code, are imported to read their docstrings. Test suites, IDLE, tkinter and
the turtle demos are skipped as code-heavy or GUI-only.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import os
import pkgutil
import sys
import sysconfig

SKIPPED_PACKAGES = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "antigravity",
        "this",
        "__phello__",
        "site-packages",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
    }
)


def _docstrings_in_source(source: bytes) -> list[str]:
    """Docstrings of the module and every class/function in it, depth-first in source order."""
    tree = ast.parse(source)
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _iter_stdlib_sources(stdlib: str):
    """(module name, source path) of every pure-Python stdlib module, sorted, skipped packages excluded."""
    stack = [(stdlib, "")]
    found = []
    while stack:
        path, prefix = stack.pop()
        for info in pkgutil.iter_modules([path], prefix):
            leaf = info.name.rsplit(".", 1)[-1]
            if leaf in SKIPPED_PACKAGES or leaf.startswith("test_"):
                continue
            spec = info.module_finder.find_spec(info.name)  # FileFinder: locates the file, imports nothing
            if spec is None or not spec.origin or not spec.origin.endswith(".py"):
                continue
            found.append((info.name, spec.origin))
            if info.ispkg:
                stack.append((os.path.dirname(spec.origin), info.name + "."))
    return sorted(found)


def _builtin_module_docs() -> list[tuple[str, str]]:
    docs = []
    for name in sorted(sys.builtin_module_names):
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001, S112 - a builtin that refuses to import here: nothing to read
            continue
        parts = [inspect.getdoc(module) or ""]
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if callable(obj) and not attr.startswith("_"):
                parts.append(inspect.getdoc(obj) or "")
        text = "\n\n".join(p for p in parts if p.strip())
        if text:
            docs.append((f"builtin:{name}", text))
    return docs


@functools.lru_cache(maxsize=1)
def python_docs() -> tuple[tuple[str, str], ...]:
    """((name, text), ...): every embedded document, deterministic for a given Python installation."""
    stdlib = sysconfig.get_paths()["stdlib"]
    docs: list[tuple[str, str]] = []
    for name, origin in _iter_stdlib_sources(stdlib):
        try:
            with open(origin, "rb") as f:
                parts = _docstrings_in_source(f.read())
        except (OSError, SyntaxError, ValueError):  # unreadable or not this Python's syntax: not documentation
            continue
        if parts:
            docs.append((name, "\n\n".join(parts)))
    docs.extend(_builtin_module_docs())
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    docs.extend((f"topic:{k}", topics[k]) for k in sorted(topics) if topics[k].strip())
    return tuple(docs)
