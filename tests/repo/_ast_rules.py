"""Plumbing shared by the repository tests: finding source files, parsing them, reading imports.

The rules live in the test modules, each of which opens with its rules as data.
This module only finds the repository's Python files, parses them with `ast`
(never importing them), resolves import statements and dotted references to
absolute names, and formats violations as `path:line: message`.

Path patterns throughout are `fnmatch` patterns on repository-relative POSIX
paths, where `*` also crosses `/`: `kelpie/env/*` covers every file below
kelpie/env/.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import os
import warnings
from collections.abc import Iterable, Iterator

import attrs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Directories never scanned (besides hidden ones): virtualenvs, caches and build output.
SKIPPED_DIRS = frozenset({"__pycache__", "build", "dist", "node_modules", "venv"})


@attrs.frozen
class Violation:
    """One broken rule at one place; `subject` is what the rule is about (a name, an import)."""

    path: str
    line: int
    subject: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@attrs.frozen
class Import:
    """One imported name: `name` is absolute; `local` is the name it binds, if any, to `target`."""

    line: int
    name: str
    local: str | None = None
    target: str | None = None
    star: bool = False


def report(violations: Iterable[Violation], rule: str) -> str:
    """The assertion message of a repository test: the rule, then one violation per line."""
    lines = sorted(violations, key=lambda v: (v.path, v.line, v.message))
    return f"{len(lines)} violation(s) of: {rule}\n" + "\n".join(f"  {v}" for v in lines)


def matches(path: str, patterns: Iterable[str]) -> bool:
    """True when `path` matches any of the fnmatch `patterns` (`*` crosses `/`)."""
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def python_files(*patterns: str) -> list[str]:
    """Every Python file of the repository matching any pattern (all of them by default), sorted."""
    found = []
    for top, dirs, files in os.walk(REPO_ROOT):
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and d not in SKIPPED_DIRS and not d.endswith(".egg-info")
        )
        rel_top = os.path.relpath(top, REPO_ROOT).replace(os.sep, "/")
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = name if rel_top == "." else f"{rel_top}/{name}"
            if not patterns or matches(path, patterns):
                found.append(path)
    return sorted(found)


def parse_source(source: str, path: str = "<snippet>") -> ast.Module:
    """Parses `source`; warnings about its contents (escape sequences) are ruff's business."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(source, filename=path)


@functools.cache
def read_source(path: str) -> str:
    """The text of the repository file `path`."""
    with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
        return f.read()


def module_name(path: str) -> tuple[str, bool]:
    """The dotted module name of `path` and whether it is a package's __init__."""
    parts = path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def resolve_relative(module: str | None, level: int, importer: str, is_package: bool) -> str | None:
    """The absolute module of `from <level dots><module> import ...` in `importer`, or None."""
    if level == 0:
        return module
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    if len(package) < level:
        return None  # beyond the top-level package: Python refuses it too
    base = package[: len(package) - level + 1]
    return ".".join([*base, module] if module else base)


def _dynamic_import(node: ast.Call) -> str | None:
    """The module named by `importlib.import_module("x")` or `__import__("x")`, if constant."""
    func = node.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    if name not in {"__import__", "import_module"} or not node.args:
        return None
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value if not first.value.startswith(".") else None
    return None


def imports(tree: ast.AST, path: str = "<snippet>.py") -> Iterator[Import]:
    """Every import in `tree` (at any depth), with relative imports made absolute.

    `import a.b` binds `a`; `import a.b as x` binds `x` to `a.b`; `from m import n
    as k` imports `m.n` and binds `k` to it. Constant-string dynamic imports are
    included, binding nothing.
    """
    importer, is_package = module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    yield Import(node.lineno, alias.name, alias.asname, alias.name)
                else:
                    head = alias.name.partition(".")[0]
                    yield Import(node.lineno, alias.name, head, head)
        elif isinstance(node, ast.ImportFrom):
            base = resolve_relative(node.module, node.level, importer, is_package)
            if base is None:
                continue
            for alias in node.names:
                if alias.name == "*":
                    yield Import(node.lineno, base, star=True)
                    continue
                name = f"{base}.{alias.name}"
                yield Import(node.lineno, name, alias.asname or alias.name, name)
        elif isinstance(node, ast.Call) and (dynamic := _dynamic_import(node)):
            yield Import(node.lineno, dynamic)


def aliases(tree: ast.AST, path: str = "<snippet>.py") -> dict[str, str]:
    """Local name -> the absolute dotted name it was imported as, over the whole module.

    Scopes are ignored: a name imported in any function counts everywhere, which
    can only make the rules stricter.
    """
    return {i.local: i.target for i in imports(tree, path) if i.local and i.target}


def dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    """The absolute dotted name of `a.b.c` when `a` is an imported name, else None."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        base = dotted(node.value, names)
        return None if base is None else f"{base}.{node.attr}"
    return None


def references(tree: ast.AST, names: dict[str, str]) -> Iterator[tuple[ast.expr, str]]:
    """Every maximal `a.b.c` (or bare `a`) in `tree` that resolves through imports, with its name.

    A name assigned to (`time = 3`) is not a reference; an attribute assigned to
    (`time.time = fake`) is.
    """
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Name | ast.Attribute):
            name = dotted(node, names)
            if name is not None:
                if not (isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load)):
                    yield node, name
                continue
        todo.extend(ast.iter_child_nodes(node))
