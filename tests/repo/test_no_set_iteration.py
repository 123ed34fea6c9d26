"""No iteration over sets in runtime code (DESIGN.md §4, item 4).

A set iterates in an order that depends on its elements' hashes: salted per
process for strings unless PYTHONHASHSEED is fixed, memory addresses for plain
objects. A loop over a set can therefore run its body in a different order in
two runs of one seed, and the trace diverges. Iterate `sorted(s, key=...)`.

The rule is a heuristic over each module's AST. An expression is known to be a set when it is
- a set display or comprehension, or a call of set() or frozenset();
- `a | b`, `a & b`, `a - b` or `a ^ b` with a set or a dict view (`d.keys()`) on either side;
- a set's union(), intersection(), difference(), symmetric_difference() or copy();
- a name all of whose bindings in its scope are sets, or which is annotated as a set
  (`x: set[str]`, `s: AbstractSet[int]`, a parameter `s: frozenset[str]`);
- `self.name`, judged the same way over the module's `self.name = ...` assignments,
  class-body fields (`name: set[str] = attrs.field(factory=set)`) and properties;
- a call of a function of the module annotated to return a set;
- an attribute that is a set on any object (SET_ATTRIBUTES: trio's `nursery.child_tasks`).
It is flagged when a `for` loop, a list, dict or generator comprehension, `yield from`,
`*` unpacking, or an order-keeping call (ORDERED_CALLS, ORDERED_METHODS) iterates it,
and when min() or max() picks from it by a `key=` (ties go to the first in set order).
Order-free uses are accepted: sorted(), `in`, len(), sum(), any(), all(), plain min()
and max(), set() or frozenset() of it, a set comprehension over it, and any comprehension
passed straight to one of ORDER_FREE_CALLS.

`Task.child_nurseries` is not a set: trio 0.35 returns a list, in the order the
nurseries were opened, so it is safe to iterate.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from typing import Any

import pytest
from _ast_rules import Violation, matches, parse_source, python_files, read_source, report

#: The code held to the rule (`*` crosses `/`: every module below kelpie/ and scenarios/).
SCANNED = ("kelpie/*.py", "scenarios/*.py")

#: Path pattern (`*` crosses `/`) -> why its set iteration cannot reach a simulated run.
ALLOWED: dict[str, str] = {}

#: Names of set types in annotations (the last component counts: `typing.AbstractSet`).
SET_TYPES = frozenset({"AbstractSet", "FrozenSet", "MutableSet", "Set", "frozenset", "set"})
#: Annotation wrappers whose arguments are looked into: `Optional[set[str]]`.
TYPE_WRAPPERS = frozenset({"Annotated", "ClassVar", "Final", "Optional", "Union"})
#: Calls that build a set.
SET_CONSTRUCTORS = frozenset({"frozenset", "set"})
#: Methods of a set that return a set.
SET_METHODS = frozenset({"copy", "difference", "intersection", "symmetric_difference", "union"})
#: Methods of a dict returning a view that `&`, `|`, `-` and `^` turn into a set.
DICT_VIEWS = frozenset({"items", "keys"})
#: Attributes that are sets whatever they belong to -> what they are.
SET_ATTRIBUTES = {"child_tasks": "trio's Nursery.child_tasks, a frozenset of tasks"}
#: Calls whose result keeps the order of their iterable arguments.
ORDERED_CALLS = frozenset({"enumerate", "filter", "iter", "list", "map", "tuple", "zip"})
#: Methods whose result keeps the order of their iterable arguments.
ORDERED_METHODS = frozenset({"extend", "fromkeys", "join"})
#: Calls whose result does not depend on the order of their argument.
ORDER_FREE_CALLS = frozenset(
    {"all", "any", "frozenset", "len", "max", "min", "set", "sorted", "sum"}
)
#: Methods that are order-free when called on a set (`seen.update(x for x in other)`).
SET_UPDATE_METHODS = frozenset(
    {
        "difference",
        "difference_update",
        "intersection",
        "intersection_update",
        "isdisjoint",
        "issubset",
        "issuperset",
        "symmetric_difference",
        "symmetric_difference_update",
        "union",
        "update",
    }
)
#: Order-free calls that become order-dependent with a `key=`: ties go to the first in order.
KEYED_PICKS = frozenset({"max", "min"})

_SET_OPERATORS = ast.BitOr | ast.BitAnd | ast.Sub | ast.BitXor


class _Scope:
    """The bindings of one function (or the module, or `self.` attributes): value or annotation."""

    def __init__(self, parent: _Scope | None) -> None:
        self.parent = parent
        #: name -> (bound value, or None when unknown; the scope the value is read in)
        self.values: dict[str, list[tuple[ast.expr | None, _Scope]]] = {}
        self.annotations: dict[str, list[ast.expr]] = {}

    def owner(self, name: str) -> _Scope | None:
        scope: _Scope | None = self
        while scope is not None and name not in scope.values and name not in scope.annotations:
            scope = scope.parent
        return scope


def _last_name(node: ast.AST) -> str | None:
    return node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def _is_set_annotation(annotation: ast.expr) -> bool:
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        try:
            annotation = ast.parse(annotation.value, mode="eval").body
        except SyntaxError:
            return False
    if isinstance(annotation, ast.BinOp):  # `set[str] | None`
        return _is_set_annotation(annotation.left) or _is_set_annotation(annotation.right)
    if isinstance(annotation, ast.Subscript):
        if _last_name(annotation.value) in TYPE_WRAPPERS:
            inner = annotation.slice
            elts = inner.elts if isinstance(inner, ast.Tuple) else [inner]
            return any(_is_set_annotation(elt) for elt in elts)
        annotation = annotation.value
    return _last_name(annotation) in SET_TYPES


def _is_set_factory(call: ast.Call) -> bool:
    """`attrs.Factory(set)`, `attrs.field(factory=set)`, `field(default_factory=frozenset)`."""
    if _last_name(call.func) == "Factory" and call.args:
        return _last_name(call.args[0]) in SET_CONSTRUCTORS
    return any(
        (kw.arg in {"factory", "default_factory"} and _last_name(kw.value) in SET_CONSTRUCTORS)
        or (kw.arg == "default" and isinstance(kw.value, ast.Call) and _is_set_factory(kw.value))
        for kw in call.keywords
    )


def _is_dict_view(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in DICT_VIEWS
        and not node.args
    )


class _Collector(ast.NodeVisitor):
    """One pass over a module: its bindings, and every place that iterates something."""

    def __init__(self) -> None:
        self.scope = _Scope(None)
        self.attrs = _Scope(None)
        self.set_functions: set[str] = set()
        #: (iterated expression, how, the scope it is read in, a receiver that makes it moot)
        self.sites: list[tuple[ast.expr, str, _Scope, ast.expr | None]] = []
        self._order_free: set[int] = set()  # ids of comprehensions and `*x` whose order is moot
        self._order_free_on_sets: dict[int, ast.expr] = {}  # ... when this receiver is a set
        self._class_body = False

    # -- bindings -------------------------------------------------------------------------

    def _bind(self, target: ast.expr, value: ast.expr | None) -> None:
        if isinstance(target, ast.Name):
            scope = self.attrs if self._class_body else self.scope
            scope.values.setdefault(target.id, []).append((value, self.scope))
        elif isinstance(target, ast.Attribute) and _is_self(target.value):
            self.attrs.values.setdefault(target.attr, []).append((value, self.scope))
        elif isinstance(target, ast.Tuple | ast.List):
            for elt in target.elts:
                self._bind(elt.value if isinstance(elt, ast.Starred) else elt, None)

    def _annotate(self, target: ast.expr, annotation: ast.expr) -> None:
        if isinstance(target, ast.Name):
            scope = self.attrs if self._class_body else self.scope
            scope.annotations.setdefault(target.id, []).append(annotation)
        elif isinstance(target, ast.Attribute) and _is_self(target.value):
            self.attrs.annotations.setdefault(target.attr, []).append(annotation)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        for target in node.targets:
            self._bind(target, node.value)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.generic_visit(node)
        self._annotate(node.target, node.annotation)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.generic_visit(node)
        self._bind(node.target, node.value)

    def visit_withitem(self, node: ast.withitem) -> None:
        self.generic_visit(node)
        if node.optional_vars is not None:
            self._bind(node.optional_vars, None)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self._bind(ast.Name(node.name), None)
        self.generic_visit(node)

    def visit_alias(self, node: ast.alias) -> None:
        self._bind(ast.Name((node.asname or node.name).partition(".")[0]), None)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for expr in (*node.decorator_list, *node.args.defaults, *node.args.kw_defaults):
            if expr is not None:
                self.visit(expr)
        self._bind(ast.Name(node.name), None)
        if node.returns is not None and _is_set_annotation(node.returns):
            if any(_last_name(d) in {"property", "cached_property"} for d in node.decorator_list):
                self.attrs.annotations.setdefault(node.name, []).append(node.returns)
            else:
                self.set_functions.add(node.name)
        inner = _Scope(self.scope)
        args = node.args
        for arg in (*args.posonlyargs, *args.args, args.vararg, *args.kwonlyargs, args.kwarg):
            if arg is None:
                continue
            if arg.annotation is not None and arg is not args.vararg and arg is not args.kwarg:
                inner.annotations.setdefault(arg.arg, []).append(arg.annotation)
            else:
                inner.values.setdefault(arg.arg, []).append((None, inner))
        self._in_scope(inner, node.body)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        for expr in (*node.args.defaults, *node.args.kw_defaults):
            if expr is not None:
                self.visit(expr)
        inner = _Scope(self.scope)
        for arg in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs):
            inner.values.setdefault(arg.arg, []).append((None, inner))
        self._in_scope(inner, [node.body])

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in (*node.decorator_list, *node.bases, *node.keywords):
            self.visit(expr)
        self._bind(ast.Name(node.name), None)
        saved = self._class_body
        self._class_body = True
        for stmt in node.body:
            self.visit(stmt)
        self._class_body = saved

    def _in_scope(self, scope: _Scope, body: list[ast.stmt] | list[ast.expr]) -> None:
        saved = self.scope, self._class_body
        self.scope, self._class_body = scope, False
        for node in body:
            self.visit(node)
        self.scope, self._class_body = saved

    # -- iteration ------------------------------------------------------------------------

    def _site(self, expr: ast.expr, how: str, unless_set: ast.expr | None = None) -> None:
        self.sites.append((expr, how, self.scope, unless_set))

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self._site(node.iter, "a for loop")
        self._bind(node.target, None)
        self.generic_visit(node)

    visit_AsyncFor = visit_For

    def _comprehension(self, node: ast.ListComp | ast.GeneratorExp | ast.DictComp) -> None:
        if id(node) not in self._order_free:
            kind = {ast.ListComp: "list", ast.GeneratorExp: "generator", ast.DictComp: "dict"}
            receiver = self._order_free_on_sets.get(id(node))
            for generator in node.generators:
                self._site(generator.iter, f"a {kind[type(node)]} comprehension", receiver)
        self.generic_visit(node)

    visit_ListComp = visit_GeneratorExp = visit_DictComp = _comprehension

    def visit_Call(self, node: ast.Call) -> None:
        name = _last_name(node.func)
        if isinstance(node.func, ast.Name) and name in ORDER_FREE_CALLS:
            self._order_free.update(id(arg) for arg in node.args)
            if name in KEYED_PICKS and any(kw.arg == "key" for kw in node.keywords):
                for arg in node.args:
                    self._site(arg, f"{name}(key=...)")
        elif isinstance(node.func, ast.Attribute) and name in SET_UPDATE_METHODS:
            self._order_free_on_sets.update((id(arg), node.func.value) for arg in node.args)
        if (isinstance(node.func, ast.Name) and name in ORDERED_CALLS) or (
            isinstance(node.func, ast.Attribute) and name in ORDERED_METHODS
        ):
            for arg in node.args:
                if not isinstance(arg, ast.Starred):
                    self._site(arg, f"{name}()")
        self.generic_visit(node)

    def visit_Set(self, node: ast.Set) -> None:
        self._order_free.update(id(elt) for elt in node.elts)
        self.generic_visit(node)

    def visit_Starred(self, node: ast.Starred) -> None:
        if isinstance(node.ctx, ast.Load) and id(node) not in self._order_free:
            self._site(node.value, "* unpacking")
        self.generic_visit(node)

    def visit_YieldFrom(self, node: ast.YieldFrom) -> None:
        self._site(node.value, "yield from")
        self.generic_visit(node)


class _Inference:
    """Decides which expressions of one module are sets (see the module docstring)."""

    def __init__(self, module: _Collector) -> None:
        self._module = module
        self._memo: dict[tuple[int, str], bool] = {}
        self._checks: dict[type, Callable[[Any, _Scope], bool]] = {
            ast.Set: lambda expr, scope: True,
            ast.SetComp: lambda expr, scope: True,
            ast.Call: self._call,
            ast.BinOp: self._binop,
            ast.Name: lambda expr, scope: self._name(scope.owner(expr.id), expr.id),
            ast.Attribute: self._attribute,
            ast.IfExp: lambda expr, scope: (
                self.is_set(expr.body, scope) or self.is_set(expr.orelse, scope)
            ),
            ast.BoolOp: lambda expr, scope: any(self.is_set(v, scope) for v in expr.values),
            ast.NamedExpr: lambda expr, scope: self.is_set(expr.value, scope),
        }

    def is_set(self, expr: ast.expr, scope: _Scope) -> bool:
        check = self._checks.get(type(expr))
        return check is not None and check(expr, scope)

    def _call(self, call: ast.Call, scope: _Scope) -> bool:
        func, functions = call.func, self._module.set_functions
        if isinstance(func, ast.Name):
            return func.id in SET_CONSTRUCTORS or func.id in functions or _is_set_factory(call)
        if isinstance(func, ast.Attribute):
            return (
                (_is_self(func.value) and func.attr in functions)
                or (func.attr in SET_METHODS and self.is_set(func.value, scope))
                or _is_set_factory(call)
            )
        return False

    def _binop(self, expr: ast.BinOp, scope: _Scope) -> bool:
        return isinstance(expr.op, _SET_OPERATORS) and any(
            _is_dict_view(side) or self.is_set(side, scope) for side in (expr.left, expr.right)
        )

    def _attribute(self, expr: ast.Attribute, scope: _Scope) -> bool:
        if expr.attr in SET_ATTRIBUTES:
            return True
        return _is_self(expr.value) and self._name(self._module.attrs, expr.attr)

    def _name(self, scope: _Scope | None, name: str) -> bool:
        """True when `name` in `scope` is annotated as a set, or every value bound to it is one."""
        if scope is None:
            return False
        key = (id(scope), name)
        if key not in self._memo:
            self._memo[key] = True  # `s = s | other` keeps `s` a set
            annotations = scope.annotations.get(name)
            values = scope.values.get(name, [])
            self._memo[key] = (
                any(_is_set_annotation(a) for a in annotations)
                if annotations
                else bool(values) and all(v is not None and self.is_set(v, s) for v, s in values)
            )
        return self._memo[key]


def set_iteration_violations(source: str, path: str = "kelpie/snippet.py") -> list[Violation]:
    """Every place in `source` that iterates over a known set in an order-dependent way."""
    module = _Collector()
    module.visit(parse_source(source, path))
    inference = _Inference(module)
    found = []
    for expr, how, scope, unless_set in module.sites:
        if unless_set is not None and inference.is_set(unless_set, scope):
            continue
        if inference.is_set(expr, scope):
            text = ast.unparse(expr)
            text = text if len(text) <= 60 else text[:57] + "..."
            message = f"{how} iterates over a set, `{text}`, in hash order: iterate sorted(...)"
            found.append(Violation(path, expr.lineno, text, message))
    return sorted(found, key=lambda v: (v.line, v.subject))


# -- the repository ----------------------------------------------------------------------


def test_runtime_code_never_iterates_over_a_set() -> None:
    """Finds no loop, comprehension or order-keeping call over a set in kelpie/ or scenarios/."""
    files = [p for p in python_files(*SCANNED) if not matches(p, ALLOWED)]
    assert "kelpie/sim/_simulation.py" in files, files
    violations = [v for p in files for v in set_iteration_violations(read_source(p), p)]
    if violations:
        pytest.fail(report(violations, "no iteration over sets (DESIGN.md §4)"), pytrace=False)


# -- the checker itself ------------------------------------------------------------------

_CLASS_WITH_SET_ATTRIBUTE = """\
class Scheduler:
    def __init__(self) -> None:
        self.ready: set[int] = set()

    def run(self) -> None:
        for task in self.ready:
            pass
"""

_ATTRS_FIELD = """\
@attrs.define
class Registry:
    names: set[str] = attrs.field(factory=set)

    def listing(self) -> tuple[str, ...]:
        return tuple(self.names)
"""

_SET_VALUED_ATTRIBUTE = """\
class Directory:
    def __init__(self, names) -> None:
        self.names = set(names)

    def dump(self):
        return [n for n in self.names]
"""

_PROPERTY = """\
class Node:
    @property
    def peers(self) -> frozenset[str]:
        return frozenset()

    def ping(self):
        for peer in self.peers:
            pass
"""


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("for x in {1, 2}:\n    pass\n", id="set-display"),
        pytest.param("for x in {a for a in y}:\n    pass\n", id="set-comprehension"),
        pytest.param("for x in set(y):\n    pass\n", id="set-call"),
        pytest.param(
            "async def f():\n    async for x in frozenset(y):\n        pass\n", id="async-for"
        ),
        pytest.param("s = set()\nfor x in s:\n    pass\n", id="name-assigned-set"),
        pytest.param("s = {1}\ns = s | t\nfor x in s:\n    pass\n", id="name-rebound-to-union"),
        pytest.param("s: set[str] = load()\nfor x in s:\n    pass\n", id="name-annotated"),
        pytest.param(
            "s: 'set[str] | None' = None\nfor x in s or ():\n    pass\n", id="string-annotation"
        ),
        pytest.param("def f(s: frozenset[int]):\n    return [x for x in s]\n", id="parameter"),
        pytest.param(
            "def f(s: typing.AbstractSet[str]):\n    for x in s:\n        pass\n", id="abstract-set"
        ),
        pytest.param(
            "def f(s: Optional[MutableSet[str]]):\n    for x in s:\n        pass\n", id="optional"
        ),
        pytest.param("s = set()\ndef f():\n    for x in s:\n        pass\n", id="module-level-set"),
        pytest.param("def f(a, b: set[str]):\n    return list(a | b)\n", id="union-operator"),
        pytest.param("def f(a, b: set[str]):\n    return list(b - a)\n", id="difference-operator"),
        pytest.param(
            "def f(a: set[str], b):\n    return list(a & b)\n", id="intersection-operator"
        ),
        pytest.param("def f(a: set[str], b):\n    return list(b ^ a)\n", id="symmetric-operator"),
        pytest.param("def f(d, e):\n    return list(d.keys() & e)\n", id="keys-view-operator"),
        pytest.param(
            "def f(a: set[int], b):\n    for x in a.union(b):\n        pass\n", id="set-method"
        ),
        pytest.param(_CLASS_WITH_SET_ATTRIBUTE, id="self-attribute-annotated"),
        pytest.param(_ATTRS_FIELD, id="attrs-field"),
        pytest.param(_SET_VALUED_ATTRIBUTE, id="self-attribute-assigned"),
        pytest.param(_PROPERTY, id="property"),
        pytest.param(
            "def f() -> set[str]:\n    return set()\nfor x in f():\n    pass\n", id="set-function"
        ),
        pytest.param("for t in nursery.child_tasks:\n    pass\n", id="child-tasks"),
        pytest.param("tasks = list(nursery.child_tasks)\n", id="child-tasks-list"),
        pytest.param("x = tuple(set(y))\n", id="tuple"),
        pytest.param("x = list(enumerate(set(y)))\n", id="enumerate"),
        pytest.param("x = next(iter(set(y)))\n", id="next-iter"),
        pytest.param("x = ', '.join(set(y))\n", id="join"),
        pytest.param("x = dict(zip(keys, set(y)))\n", id="zip"),
        pytest.param("x = list(map(str, set(y)))\n", id="map"),
        pytest.param("out.extend(set(y))\n", id="extend"),
        pytest.param("x = dict.fromkeys(set(y))\n", id="fromkeys"),
        pytest.param("x = {k: 1 for k in set(y)}\n", id="dict-comprehension"),
        pytest.param("x = (k for k in set(y))\n", id="generator"),
        pytest.param("d = {}\nd.update((k, 1) for k in set(y))\n", id="dict-update-generator"),
        pytest.param("x = [*set(y)]\n", id="star-in-list"),
        pytest.param("f(*set(y))\n", id="star-in-call"),
        pytest.param("def g():\n    yield from set(y)\n", id="yield-from"),
        pytest.param("x = min(set(y), key=len)\n", id="min-with-key"),
        pytest.param("for x in (set(y) if c else []):\n    pass\n", id="conditional"),
    ],
)
def test_checker_flags_iteration_over_a_set(source: str) -> None:
    """Flags each order-dependent iteration over a known set, once."""
    found = set_iteration_violations(source)
    assert len(found) == 1, [str(v) for v in found]


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("for x in sorted({1, 2}):\n    pass\n", id="sorted-display"),
        pytest.param("s = set()\nfor x in sorted(s, key=str):\n    pass\n", id="sorted-name"),
        pytest.param("s = set()\nok = 3 in s and 4 not in s\n", id="membership"),
        pytest.param("n = len(set(y))\n", id="len"),
        pytest.param("n = sum(set(y))\n", id="sum"),
        pytest.param("ok = any(x > 1 for x in set(y))\n", id="any"),
        pytest.param("ok = all([x > 1 for x in set(y)])\n", id="all"),
        pytest.param("lo, hi = min(set(y)), max(set(y))\n", id="min-max"),
        pytest.param("x = sorted(k for k in set(y))\n", id="sorted-generator"),
        pytest.param("x = {k + 1 for k in set(y)}\n", id="set-comprehension-over-set"),
        pytest.param("x = frozenset(k for k in set(y))\n", id="frozenset-of-generator"),
        pytest.param("x = {*a, *set(y)}\n", id="star-in-set"),
        pytest.param("s = set()\ns.update(k for k in set(y))\n", id="set-update-generator"),
        pytest.param("x = set(y) | set(z)\n", id="set-algebra-without-iteration"),
        pytest.param("for x in xs:\n    pass\n", id="unknown-name"),
        pytest.param("for x in a | b:\n    pass\n", id="unknown-operands"),
        pytest.param(
            "for x in d.keys():\n    pass\nfor k, v in d.items():\n    pass\n", id="dict-views"
        ),
        pytest.param("for n in task.child_nurseries:\n    pass\n", id="child-nurseries-is-a-list"),
        pytest.param(
            "for t in sorted(nursery.child_tasks, key=f):\n    pass\n", id="sorted-child-tasks"
        ),
        pytest.param(
            "busy = any(n.child_tasks for n in task.child_nurseries)\n", id="child-tasks-truth"
        ),
        pytest.param("s = set(y)\ns = sorted(s)\nfor x in s:\n    pass\n", id="rebound-to-sorted"),
        pytest.param(
            "def f():\n    s = set()\n    return len(s)\n"
            "def g(s):\n    for x in s:\n        pass\n",
            id="other-scope",
        ),
        pytest.param(
            "s = set()\ndef g(s: list[int]):\n    for x in s:\n        pass\n",
            id="shadowing-parameter",
        ),
        pytest.param(
            "def f(s: set[int]):\n    for x in sorted(s):\n        pass\n", id="sorted-parameter"
        ),
        pytest.param(
            "class C:\n    def run(self):\n        for x in self.items:\n            pass\n",
            id="unknown-attribute",
        ),
        pytest.param("for i, x in enumerate(sorted(set(y))):\n    pass\n", id="enumerate-sorted"),
        pytest.param("x = ' '.join(sorted(set(y)))\n", id="join-sorted"),
        pytest.param("n = len(a - b)\nx = list(a - 1)\n", id="arithmetic"),
    ],
)
def test_checker_accepts_order_free_uses_of_sets(source: str) -> None:
    """Accepts sorted(), membership, len() and order-free reductions, and non-sets."""
    assert set_iteration_violations(source) == [], source


def test_checker_reports_line_and_expression() -> None:
    """Reports path:line, how the set is iterated and the iterated expression."""
    source = "def f(tasks: set[str]):\n    x = 1\n    for t in tasks:\n        pass\n"
    assert [str(v) for v in set_iteration_violations(source, "kelpie/runtime/_x.py")] == [
        "kelpie/runtime/_x.py:3: a for loop iterates over a set, `tasks`, in hash order: "
        "iterate sorted(...)"
    ]
