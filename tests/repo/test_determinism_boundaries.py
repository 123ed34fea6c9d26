"""No wall clock, entropy, threads, sockets or subprocesses outside the Env (DESIGN.md §3-4).

Kelpie's code reads time through `trio.current_time()` and `env.clock`, draws
randomness from `env.rng`, and reaches the outside world only through its `Env`.
At run time the simulator's sanitizer virtualizes or blocks stray calls, but it
cannot see a function bound to another name before the run (`from time import
perf_counter`), nor `datetime.now()`, which reads the C clock directly. This test
closes that gap statically: no module of kelpie/ or scenarios/ outside ALLOWED
imports or references a BANNED name, under any alias. A second rule keeps every
touch of trio's private names in kelpie/sim/_trio_hooks.py (DESIGN.md §4).

Both rules read the AST only: an import (`import time`, `from os import urandom`,
`import trio.to_thread`) and a reference through an imported name
(`t.time()` after `import time as t`, `now()` after `from time import time as now`)
each count, at their own line.
"""

from __future__ import annotations

import ast
import fnmatch

import pytest
from _ast_rules import (
    Violation,
    aliases,
    imports,
    matches,
    parse_source,
    python_files,
    read_source,
    references,
    report,
)

#: The code held to the rule (`*` crosses `/`: every module below kelpie/ and scenarios/).
SCANNED = ("kelpie/*.py", "scenarios/*.py")

#: Path pattern (`*` crosses `/`) -> why that code may touch the real world.
ALLOWED = {
    "kelpie/env/*": "the environment itself: the one place that reads the real world",
    "kelpie/storage/_sqlite.py": "real backend: a file, the wall clock for versions, lock backoff",
    "kelpie/storage/_postgres.py": "real backend: libpq's socket, waited on by trio",
    "kelpie/storage/_fdb.py": "real backend: the FoundationDB client runs its own network thread",
    "kelpie/sim/_sanitizer.py": "patches these very functions to virtualize or block them",
    "kelpie/sim/_trio_hooks.py": "names trio's thread starters so the sanitizer can block them",
    "kelpie/sim/_sweep.py": "harness: starts worker processes on the real clock, outside any run",
    "kelpie/sim/_report.py": "harness: asks git for the commit, outside any run",
    "kelpie/sim/worker.py": "harness: the sweep's fork server forks one process per seed",
    "kelpie/cli.py": "harness: draws a fresh seed from the OS and starts sweeps, outside any run",
    "scenarios/leak.py": "planted nondeterminism: reads the real clock on purpose (planted_bug)",
}

#: Allowlisted files that do not exist yet (none now: every real backend of DESIGN.md §5 exists).
PLANNED: frozenset[str] = frozenset()

_CLOCK = "the real clock: use trio.current_time() or env.clock"
_ENTROPY = "OS entropy: use env.rng"
_THREADS = "real threads"
_PROCESSES = "real processes: go through the Env's process launcher"
_NETWORK = "real network I/O: go through the Env"

#: Name pattern (fnmatch) -> why it is banned. A pattern covers the name and everything
#: under it (`trio.to_thread` covers `trio.to_thread.run_sync`); for a module, that
#: means importing it at all.
BANNED = {
    "_thread": _THREADS,
    "asyncio": "a second event loop, with its own clock and threads",
    "concurrent.futures": "thread and process pools",
    "datetime.date.today": _CLOCK,
    "datetime.datetime.now": _CLOCK,
    "datetime.datetime.today": _CLOCK,
    "datetime.datetime.utcnow": _CLOCK,
    "multiprocessing": _PROCESSES,
    "os.exec*": _PROCESSES,
    "os.fork": _PROCESSES,
    "os.forkpty": _PROCESSES,
    "os.getrandom": _ENTROPY,
    "os.popen": _PROCESSES,
    "os.posix_spawn*": _PROCESSES,
    "os.spawn*": _PROCESSES,
    "os.system": _PROCESSES,
    "os.urandom": _ENTROPY,
    "random": "the global, unseeded generator: use env.rng",
    "secrets": _ENTROPY,
    "selectors": "real I/O readiness",
    "socket": _NETWORK,
    "subprocess": _PROCESSES,
    "threading": _THREADS,
    "time": _CLOCK,
    "trio.Path": "file I/O on trio's worker threads: go through the Env",
    "trio.from_thread": _THREADS,
    "trio.lowlevel.open_process": _PROCESSES,
    "trio.lowlevel.start_thread_soon": _THREADS,
    "trio.open_file": "file I/O on trio's worker threads: go through the Env",
    "trio.open_ssl_over_tcp_listeners": _NETWORK,
    "trio.open_ssl_over_tcp_stream": _NETWORK,
    "trio.open_tcp_listeners": _NETWORK,
    "trio.open_tcp_stream": _NETWORK,
    "trio.open_unix_socket": _NETWORK,
    "trio.run_process": _PROCESSES,
    "trio.serve_ssl_over_tcp": _NETWORK,
    "trio.serve_tcp": _NETWORK,
    "trio.socket": _NETWORK,
    "trio.to_thread": _THREADS,
    "trio.wrap_file": "file I/O on trio's worker threads: go through the Env",
    "uuid.uuid1": "the host id and the real clock: use env.rng.uuid4()",
    "uuid.uuid4": _ENTROPY,
}

#: The one module that may touch trio's private names (DESIGN.md §4: one place, pinned trio).
TRIO_PRIVATE_ALLOWED = {
    "kelpie/sim/_trio_hooks.py": "the scheduler hooks, checked by tests/sim/test_trio_canary.py",
}


def banned_because(name: str) -> str | None:
    """Why `name` is banned, or None when it is not."""
    for pattern, reason in BANNED.items():
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*"):
            return reason
    return None


def _star_hides_banned(module: str) -> bool:
    prefix = module + "."
    return banned_because(module) is not None or any(p.startswith(prefix) for p in BANNED)


def boundary_violations(source: str, path: str = "kelpie/snippet.py") -> list[Violation]:
    """Every import of, and reference to, a banned name in `source`."""
    tree = parse_source(source, path)
    found = []
    for imp in imports(tree, path):
        if imp.star and _star_hides_banned(imp.name):
            message = f"star import from {imp.name}, which holds banned names"
            found.append(Violation(path, imp.line, imp.name, message))
        elif reason := banned_because(imp.name):
            found.append(Violation(path, imp.line, imp.name, f"imports {imp.name} ({reason})"))
    names = aliases(tree, path)
    for node, name in references(tree, names):
        if reason := banned_because(name):
            written = ast.unparse(node)
            via = "" if written == name else f" (as `{written}`)"
            message = f"uses {name}{via} ({reason})"
            found.append(Violation(path, node.lineno, name, message))
    return sorted(found, key=lambda v: (v.line, v.subject))


def _is_trio_private(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "trio" and any(
        p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in parts[1:]
    )


def trio_private_violations(source: str, path: str = "kelpie/snippet.py") -> list[Violation]:
    """Every import of, and reference to, a private name inside trio in `source`."""
    tree = parse_source(source, path)
    found = {(imp.line, imp.name) for imp in imports(tree, path) if _is_trio_private(imp.name)} | {
        (node.lineno, name)
        for node, name in references(tree, aliases(tree, path))
        if _is_trio_private(name)
    }
    return [
        Violation(path, line, name, f"touches trio's private {name}: keep it in _trio_hooks.py")
        for line, name in sorted(found)
    ]


# -- the repository ----------------------------------------------------------------------


def test_code_reaches_the_world_only_through_the_environment() -> None:
    """Finds no wall-clock, entropy, thread, socket or subprocess use outside ALLOWED."""
    files = [p for p in python_files(*SCANNED) if not matches(p, ALLOWED)]
    assert "kelpie/sim/_simulation.py" in files, files
    violations = [v for p in files for v in boundary_violations(read_source(p), p)]
    if violations:
        pytest.fail(report(violations, "no real clock, entropy, threads or I/O"), pytrace=False)


def test_only_the_trio_hooks_touch_trio_internals() -> None:
    """Finds trio's private names only in kelpie/sim/_trio_hooks.py."""
    files = [p for p in python_files(*SCANNED) if not matches(p, TRIO_PRIVATE_ALLOWED)]
    violations = [v for p in files for v in trio_private_violations(read_source(p), p)]
    if violations:
        pytest.fail(
            report(violations, "trio's private names stay in _trio_hooks.py"), pytrace=False
        )


def test_allowlists_name_existing_files_with_reasons() -> None:
    """Finds a file for every allowlist entry but the planned backends, and a reason for each."""
    everything = python_files()
    stale = [
        pattern
        for pattern in (*ALLOWED, *TRIO_PRIVATE_ALLOWED)
        if pattern not in PLANNED and not any(matches(p, [pattern]) for p in everything)
    ]
    assert not stale, f"allowlist entries that match no file (typo, or a file gone): {stale}"
    reasons = {**ALLOWED, **TRIO_PRIVATE_ALLOWED, **BANNED}
    assert all(reason.strip() for reason in reasons.values())


# -- the checker itself ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import time\nx = time.time()\n", [(1, "time"), (2, "time.time")]),
        ("import time as t\nt.monotonic()\n", [(1, "time"), (2, "time.monotonic")]),
        ("from time import time as now\nnow()\n", [(1, "time.time"), (2, "time.time")]),
        ("from time import perf_counter_ns\n", [(1, "time.perf_counter_ns")]),
        ("import time\ntime.sleep(1)\n", [(1, "time"), (2, "time.sleep")]),
        ("import datetime\ndatetime.datetime.now()\n", [(2, "datetime.datetime.now")]),
        ("from datetime import datetime as dt\ndt.utcnow()\n", [(2, "datetime.datetime.utcnow")]),
        ("from datetime import date\ndate.today()\n", [(2, "datetime.date.today")]),
        ("import uuid\nuuid.uuid4()\nuuid.uuid1()\n", [(2, "uuid.uuid4"), (3, "uuid.uuid1")]),
        ("from os import urandom\n", [(1, "os.urandom")]),
        ("import os\nos.getrandom(8)\n", [(2, "os.getrandom")]),
        (
            "import os\nos.execvp('x', [])\nos.spawnl(0, 'x')\n",
            [(2, "os.execvp"), (3, "os.spawnl")],
        ),
        ("import os as o\no.posix_spawnp('x', [], {})\n", [(2, "os.posix_spawnp")]),
        ("import os\nos.system('ls')\nos.fork()\n", [(2, "os.system"), (3, "os.fork")]),
        ("import random\n", [(1, "random")]),
        ("from random import randint\n", [(1, "random.randint")]),
        ("import secrets\n", [(1, "secrets")]),
        ("import socket\n", [(1, "socket")]),
        ("import threading as th\nth.Thread()\n", [(1, "threading"), (2, "threading.Thread")]),
        ("import _thread\n", [(1, "_thread")]),
        ("import subprocess\n", [(1, "subprocess")]),
        ("import multiprocessing.pool\n", [(1, "multiprocessing.pool")]),
        ("from concurrent import futures\n", [(1, "concurrent.futures")]),
        ("import concurrent.futures\n", [(1, "concurrent.futures")]),
        ("import asyncio\n", [(1, "asyncio")]),
        ("import selectors\n", [(1, "selectors")]),
        ("import trio\ntrio.to_thread.run_sync(f)\n", [(2, "trio.to_thread.run_sync")]),
        ("import trio.to_thread\n", [(1, "trio.to_thread")]),
        ("from trio import from_thread\n", [(1, "trio.from_thread")]),
        ("import trio\ntrio.socket.socket()\n", [(2, "trio.socket.socket")]),
        ("import trio\ntrio.open_tcp_stream('h', 1)\n", [(2, "trio.open_tcp_stream")]),
        ("import trio\ntrio.serve_tcp(h, 1)\n", [(2, "trio.serve_tcp")]),
        ("import trio\ntrio.open_unix_socket('p')\n", [(2, "trio.open_unix_socket")]),
        (
            "from trio import run_process as rp\nrp([])\n",
            [(1, "trio.run_process"), (2, "trio.run_process")],
        ),
        (
            "from trio import lowlevel\nlowlevel.open_process([])\n",
            [(2, "trio.lowlevel.open_process")],
        ),
        (
            "import trio.lowlevel as ll\nll.start_thread_soon(f, g)\n",
            [(2, "trio.lowlevel.start_thread_soon")],
        ),
        ("import importlib\nimportlib.import_module('socket')\n", [(2, "socket")]),
        ("from os import *\n", [(1, "os")]),
        (
            "def f():\n    import time\n    return time.time_ns()\n",
            [(2, "time"), (3, "time.time_ns")],
        ),
    ],
)
def test_checker_flags_banned_names_under_any_alias(
    source: str, expected: list[tuple[int, str]]
) -> None:
    """Flags each banned import and reference at its line, through aliases and from-imports."""
    found = boundary_violations(source)
    assert [(v.line, v.subject) for v in found] == expected, [str(v) for v in found]


@pytest.mark.parametrize(
    "source",
    [
        "import trio\nasync def f():\n    await trio.sleep(1)\n",
        "import trio\nnow = trio.current_time()\n",
        "import uuid\nx = uuid.UUID(bytes=b'0' * 16, version=4)\n",
        "import uuid\nx = uuid.uuid5(uuid.NAMESPACE_URL, 'kelpie')\n",
        "def f(env):\n    return env.clock.wall_ns() + env.rng.randrange(3)\n",
        "import os\np = os.path.join(os.getcwd(), 'x')\n",
        "import datetime\nd = datetime.datetime.fromtimestamp(0, datetime.UTC)\n",
        "import trio.lowlevel\ntrio.lowlevel.checkpoint()\n",
        "def f(time):\n    return time.time()\n",
        "class C:\n    def time(self):\n        return self.time()\n",
        "from kelpie.env import Rng\nRng(1).random()\n",
        "import hashlib\nhashlib.blake2b(b'x')\n",
    ],
)
def test_checker_accepts_the_environment_and_pure_functions(source: str) -> None:
    """Accepts trio's virtual time, uuid.UUID, env.clock and env.rng, and pure library calls."""
    assert boundary_violations(source) == []


def test_checker_names_the_alias_and_the_reason() -> None:
    """Reports path:line, the absolute name, the local alias and the reason."""
    source = "from time import perf_counter as _real_clock\n\nx = _real_clock()\n"
    found = [str(v) for v in boundary_violations(source, "scenarios/demo.py")]
    assert found == [
        "scenarios/demo.py:1: imports time.perf_counter (the real clock: use "
        "trio.current_time() or env.clock)",
        "scenarios/demo.py:3: uses time.perf_counter (as `_real_clock`) (the real clock: use "
        "trio.current_time() or env.clock)",
    ]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import trio._core._run as r\n", [(1, "trio._core._run")]),
        ("from trio._core import _run\n", [(1, "trio._core._run")]),
        ("import trio\ntrio._core._run._r = None\n", [(2, "trio._core._run._r")]),
        (
            "from trio import _threads\n_threads.start_thread_soon\n",
            [(1, "trio._threads"), (2, "trio._threads.start_thread_soon")],
        ),
    ],
)
def test_checker_flags_trio_private_names(source: str, expected: list[tuple[int, str]]) -> None:
    """Flags imports of and references to trio's private modules and attributes."""
    found = trio_private_violations(source)
    assert [(v.line, v.subject) for v in found] == expected, [str(v) for v in found]


def test_checker_accepts_trio_public_and_dunder_names() -> None:
    """Accepts trio's public API and its dunders (`trio.__version__`, `trio.__file__`)."""
    source = "import trio\nimport trio.lowlevel\nv = (trio.__version__, trio.__file__)\n"
    source += "t = trio.lowlevel.current_task()\n"
    assert trio_private_violations(source) == []
