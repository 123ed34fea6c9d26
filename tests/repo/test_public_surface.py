"""Each package's public surface is its `__all__`, re-exported from private modules (STYLE.md).

Every package __init__ under kelpie/ (kelpie/core, kelpie/env, kelpie/runtime,
kelpie/sim, and the layers still to come) declares `__all__` as one literal list
of strings, in which:
- every name is bound in the __init__ itself (imported or defined there);
- no name starts with an underscore, and none appears twice;
- names are in ruff's isort-style order (RUF022): CONSTANTS, then Classes, then
  everything else, each group in natural order, so ruff and this test agree.
"""

from __future__ import annotations

import ast
import re

import pytest
from _ast_rules import Violation, matches, parse_source, python_files, read_source, report

#: The package __init__ files held to the rule.
SCANNED = ("kelpie/*/__init__.py",)

#: Path pattern (`*` crosses `/`) -> why that package has no public surface of its own.
EXEMPT: dict[str, str] = {}

#: Packages that must be found, so that a broken pattern cannot pass the test vacuously.
EXPECTED = (
    "kelpie/core/__init__.py",
    "kelpie/env/__init__.py",
    "kelpie/runtime/__init__.py",
    "kelpie/sim/__init__.py",
)


def _targets(node: ast.stmt) -> list[ast.expr]:
    """The assignment targets of a module-level statement (none for most statements)."""
    if isinstance(node, ast.Assign):
        return node.targets
    if isinstance(node, ast.AnnAssign):
        return [node.target] if node.value is not None else []  # `x: int` binds nothing
    if isinstance(node, ast.AugAssign | ast.For):
        return [node.target]
    if isinstance(node, ast.With):
        return [item.optional_vars for item in node.items if item.optional_vars is not None]
    return []


def _bound_names(body: list[ast.stmt]) -> set[str]:
    """Names bound at module level: imports, definitions, assignments, also under if/try/with."""
    bound: set[str] = set()
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            bound.update((a.asname or a.name).partition(".")[0] for a in node.names)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        else:
            for target in _targets(node):
                bound.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            for field in ("body", "orelse", "finalbody", "handlers"):
                bound |= _bound_names(getattr(node, field, []))
    return bound


def _all_statements(tree: ast.Module) -> list[ast.stmt]:
    """The module-level statements that assign or extend `__all__`."""
    return [
        node
        for node in tree.body
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in _targets(node))
    ]


def _literal_names(node: ast.stmt) -> list[str] | None:
    """The names of `__all__ = [...]` (or a tuple) when all are string literals, else None."""
    value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
    if not isinstance(value, ast.List | ast.Tuple):
        return None
    names = [
        e.value for e in value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
    ]
    return names if len(names) == len(value.elts) else None


def isort_key(name: str) -> tuple[int, list[object]]:
    """Ruff's RUF022 order: SCREAMING_CASE, then CamelCase, then the rest; natural within each.

    Natural order compares digit runs as numbers, except runs with a leading zero,
    which compare digit by digit and before the others (as the `natord` crate does).
    """
    category = 0 if len(name) > 1 and name.isupper() else 1 if name[:1].isupper() else 2
    chunks = re.split(r"(\d+)", name)
    natural = [
        c if i % 2 == 0 else (0, c) if c.startswith("0") else (1, int(c))
        for i, c in enumerate(chunks)
    ]
    return category, natural


def surface_violations(source: str, path: str) -> list[Violation]:
    """Every way in which the `__all__` of the package __init__ `source` breaks the rule."""
    tree = parse_source(source, path)
    statements = _all_statements(tree)
    line = statements[0].lineno if statements else 1
    names = _literal_names(statements[0]) if len(statements) == 1 else None
    if names is None:
        message = (
            "defines no __all__: list the package's public names in it"
            if not statements
            else "must assign __all__ once, as a literal list of strings"
        )
        return [Violation(path, line, "__all__", message)]
    bound = _bound_names(tree.body)
    problems = [(n, f"lists {n!r} twice") for n in sorted(set(names)) if names.count(n) > 1]
    problems += [(n, f"lists the private name {n!r}") for n in names if n.startswith("_")]
    problems += [
        (n, f"lists {n!r}, which the __init__ does not bind") for n in names if n not in bound
    ]
    if names != sorted(names, key=isort_key):
        problems.append(("__all__", f"is not in isort-style order: {sorted(names, key=isort_key)}"))
    return [Violation(path, line, subject, f"__all__ {text}") for subject, text in problems]


# -- the repository ----------------------------------------------------------------------


def test_packages_export_a_sorted_public_all() -> None:
    """Finds a sorted, public, fully bound `__all__` in every package __init__ under kelpie/."""
    files = [p for p in python_files(*SCANNED) if not matches(p, EXEMPT)]
    assert set(EXPECTED) <= set(files), files
    violations = [v for p in files for v in surface_violations(read_source(p), p)]
    if violations:
        pytest.fail(
            report(violations, "every package re-exports its surface in __all__"), pytrace=False
        )


# -- the checker itself ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ._x import A\n", ["__all__"]),
        ("from ._x import A\n__all__ = names()\n", ["__all__"]),
        ("from ._x import A\n__all__ = ['A']\n__all__ += ['B']\n", ["__all__"]),
        ("A = 1\n__all__ = ['A', A]\n", ["__all__"]),
        ("from ._x import A\n__all__ = ['A', 'B']\n", ["B"]),
        ("from ._x import A, _b\n__all__ = ['A', '_b']\n", ["_b"]),
        ("from ._x import A\n__all__ = ['A', 'A']\n", ["A"]),
        ("from ._x import A, b\n__all__ = ['b', 'A']\n", ["__all__"]),
        ("from ._x import Clock, SIM_EPOCH\n__all__ = ['Clock', 'SIM_EPOCH']\n", ["__all__"]),
        ("from ._x import item2, item10\n__all__ = ['item10', 'item2']\n", ["__all__"]),
        ("def f():\n    from ._x import A\n__all__ = ['A', 'f']\n", ["A"]),
        ("class C:\n    A = 1\n__all__ = ['A', 'C']\n", ["A"]),
    ],
)
def test_checker_flags_a_bad_all(source: str, expected: list[str]) -> None:
    """Flags a missing or computed `__all__`, unbound, private or repeated names, and bad order."""
    found = surface_violations(source, "kelpie/x/__init__.py")
    assert [v.subject for v in found] == expected, [str(v) for v in found]


@pytest.mark.parametrize(
    "source",
    [
        "__all__: list[str] = []\n",
        "from ._a import Env, derive_seed\nfrom ._b import Clock\n"
        "__all__ = ['Clock', 'Env', 'derive_seed']\n",
        "from ._a import SIM_EPOCH_NS, Clock, run\n__all__ = ('SIM_EPOCH_NS', 'Clock', 'run')\n",
        "from ._a import item2, item10\n__all__ = ['item2', 'item10']\n",
        "import kelpie.env as env\nfrom ._a import x as y\n__all__ = ['env', 'y']\n",
        "def f(): ...\nclass C: ...\nV: int = 1\nW, X = 1, 2\n"
        "__all__ = ['C', 'V', 'W', 'X', 'f']\n",
        "try:\n    from ._a import A\nexcept ImportError:\n    A = None\n__all__ = ['A']\n",
        "import typing\nif typing.TYPE_CHECKING:\n    from ._a import A\n__all__ = ['A']\n",
    ],
)
def test_checker_accepts_a_sorted_bound_public_all(source: str) -> None:
    """Accepts literal `__all__` lists of bound public names in isort-style order."""
    assert surface_violations(source, "kelpie/x/__init__.py") == []
