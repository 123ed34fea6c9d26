"""The determinism sanitizer: what a simulated run may and may not touch of the real world.

While a `Sanitizer` is active (the workload phases of a simulated run):

- *Virtualized*: `time.time`, `time.time_ns`, `time.monotonic(_ns)`,
  `time.perf_counter(_ns)` read the simulation's clocks; `uuid.uuid1/uuid4`,
  `os.urandom`, `os.getrandom`, the `secrets` module, `random.SystemRandom` and
  the global `random` functions draw from a stream of the run's seed. The run
  goes on, deterministically, and each call site is recorded once with a count:
  third-party code (SDK retry jitter, idempotency keys) legitimately does this,
  while Kelpie's own code must use `env.clock` and `env.rng` instead.
- *Blocked*: creating or using real sockets and DNS, starting subprocesses
  (`subprocess`, `os.system`, `os.exec*`, `os.posix_spawn`, `os.fork`),
  starting threads (`threading`, `_thread`, `trio.to_thread`), blocking
  `time.sleep`, and opening files outside the allowed paths. The call raises
  `DeterminismViolation` at its call site and the run fails, even if the
  exception is caught. Reads of Python's own files (under `sys.path` and the
  interpreter's prefixes) stay allowed so that lazy imports work.

Each finding names its call site: the innermost frame outside the standard
library and this module, and, when that is not the direct caller, the stdlib
frame it went through.

Sockets, subprocesses and file opens are trapped by an audit hook
(`sys.addaudithook`, installed once per process and idle unless a sanitizer is
active); the rest by patching module attributes, restored on exit. Code that
bound one of these functions to its own name before the run (`from time import
time`) is not seen: a known gap, closed for Kelpie's own code by tests/repo/.
`datetime.now()` reads the C clock directly and is likewise out of reach.
"""

from __future__ import annotations

import _thread
import calendar
import os
import random
import re
import secrets
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import attrs

from kelpie.env import Rng
from kelpie.sim import _trio_hooks


class DeterminismViolation(BaseException):
    """A simulated run touched the real world (a socket, thread, subprocess, file or sleep).

    A BaseException, so that library code catching `Exception` cannot hide it.
    """


@attrs.frozen
class Finding:
    """One call site that reached past the simulation's environment."""

    api: str
    action: str  # "virtualized" or "blocked"
    site: str
    via: str = ""
    detail: str = ""
    count: int = 1

    def describe(self) -> str:
        via = f" (via {self.via})" if self.via else ""
        detail = f" [{self.detail}]" if self.detail else ""
        times = f" x{self.count}" if self.count > 1 else ""
        return f"{self.action} {self.api} at {self.site}{via}{detail}{times}"


_STDLIB_DIRS = tuple(
    sorted(
        {
            os.path.realpath(p) + os.sep
            for p in (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"])
            if p
        }
    )
)
_THIS_FILE = os.path.realpath(__file__)

_BLOCKED_AUDIT_EVENTS = {
    "socket.__new__": "socket",
    "socket.bind": "socket",
    "socket.connect": "socket",
    "socket.getaddrinfo": "dns",
    "socket.gethostbyname": "dns",
    "socket.gethostbyaddr": "dns",
    "socket.getnameinfo": "dns",
    "subprocess.Popen": "subprocess",
    "os.system": "subprocess",
    "os.exec": "subprocess",
    "os.posix_spawn": "subprocess",
    "os.spawn": "subprocess",
    "os.fork": "subprocess",
    "os.forkpty": "subprocess",
    "pty.spawn": "subprocess",
    "os.kill": "signal",
    "os.killpg": "signal",
    "signal.pthread_kill": "signal",
    "os.chdir": "process state",
    "os.putenv": "process state",
    "os.unsetenv": "process state",
    "os.setxattr": "filesystem",
    "os.removexattr": "filesystem",
}

#: Audit events that change the file system: (api, index of the path argument(s)).
_FS_WRITE_EVENTS = {
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.mkdir": (0,),
    "os.rename": (0, 1),
    "os.link": (0, 1),
    "os.symlink": (0, 1),
    "os.truncate": (0,),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.utime": (0,),
    "shutil.rmtree": (0,),
    "shutil.copyfile": (1,),
    "shutil.copytree": (1,),
    "shutil.move": (0, 1),
}
_FS_LIST_EVENTS = frozenset({"os.listdir", "os.scandir"})

#: Files any run may read wherever they are: Python source and bytecode (imports, tracebacks).
_CODE_SUFFIXES = (".py", ".pyc")

_PYC_NAME = re.compile(r"^[^/]+\.pyc(\.\d+)?$")
#: 100-ns intervals between the UUID epoch (1582-10-15) and the Unix epoch.
_UUID_EPOCH_OFFSET = 0x01B21DD213814000

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class _HookState:
    """Process-wide: audit hooks cannot be removed, so one hook serves every sanitizer."""

    active: Sanitizer | None = None
    installed = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    sanitizer = _HookState.active
    if sanitizer is None or threading.get_ident() != sanitizer._thread:
        return  # no simulation, or another thread of the host process
    if event == "open":
        sanitizer._check_open(args)
        return
    if event in _FS_WRITE_EVENTS:
        sanitizer._check_fs_write(event, [args[i] for i in _FS_WRITE_EVENTS[event]])
        return
    if event in _FS_LIST_EVENTS:
        sanitizer._check_listing(event, args[0])
        return
    if event == "sqlite3.connect":  # SQLite opens its files in C, unseen by "open"
        sanitizer._check_sqlite(args[0])
        return
    api = _BLOCKED_AUDIT_EVENTS.get(event)
    if api is not None:
        sanitizer._block(api, detail=event)


def _install_audit_hook() -> None:
    if not _HookState.installed:
        sys.addaudithook(_audit)
        _HookState.installed = True


def _describe_frame(frame: FrameType) -> str:
    code = frame.f_code
    return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"


def _is_stdlib(filename: str) -> bool:
    """`filename` (as in a code object) belongs to the standard library."""
    if filename.startswith("<frozen"):
        return True
    return os.path.realpath(filename).startswith(_STDLIB_DIRS)


def call_site() -> tuple[str, str]:
    """(site, via): the innermost non-stdlib frame outside this module, and the direct caller."""
    frame: FrameType | None = sys._getframe(1)
    direct: FrameType | None = None
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename != _THIS_FILE:
            if direct is None:
                direct = frame
            if not _is_stdlib(filename):
                break
        frame = frame.f_back
    if frame is None:
        return (_describe_frame(direct), "") if direct is not None else ("<unknown>", "")
    if direct is not None and direct is not frame:
        return _describe_frame(frame), _describe_frame(direct)
    return _describe_frame(frame), ""


class _SeededSystemRandom(random.Random):
    """Stands in for `secrets._sysrand` and the global `random` instance, recording callers."""

    def __init__(self, seed: int, record: Callable[[str], None], api: str) -> None:
        self._record = record
        self._api = api
        super().__init__(seed)

    def random(self) -> float:
        self._record(self._api)
        return super().random()

    def getrandbits(self, k: int, /) -> int:
        self._record(self._api)
        return super().getrandbits(k)


class Sanitizer:
    """Virtualizes time and entropy and blocks real I/O while active (a context manager)."""

    def __init__(
        self,
        *,
        rng: Rng,
        wall_ns: Callable[[], int],
        monotonic_s: Callable[[], float],
        allowed_paths: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        self._rng = rng
        self._wall_ns = wall_ns
        self._monotonic_s = monotonic_s
        self._allowed_rw = tuple(os.path.realpath(p) for p in allowed_paths)
        # Deliberately independent of sys.path and the working directory, which
        # differ between `kelpie sim` and a sweep worker: the interpreter's own
        # trees, and the trees Kelpie and the scenarios are installed from.
        self._allowed_read = tuple(
            sorted({os.path.realpath(p) for p in (*_install_roots(), *self._allowed_rw)})
        )
        self._import_dirs = tuple(sorted({os.path.realpath(p or os.curdir) for p in sys.path}))
        self._thread = threading.get_ident()
        self._findings: dict[tuple[str, str, str, str], Finding] = {}
        self._order: list[tuple[str, str, str, str]] = []
        self._saved: list[tuple[object, str, object]] = []

    # -- findings ---------------------------------------------------------

    def _note(self, api: str, action: str, detail: str = "") -> Finding:
        site, via = call_site()
        key = (api, action, site, detail)
        found = self._findings.get(key)
        if found is None:
            self._order.append(key)
            found = Finding(api, action, site, via, detail)
        else:
            found = attrs.evolve(found, count=found.count + 1)
        self._findings[key] = found
        return found

    def _block(self, api: str, detail: str = "") -> None:
        found = self._note(api, "blocked", detail)
        raise DeterminismViolation(
            f"{api} is not allowed inside a simulation: {found.site}"
            + (f" (via {found.via})" if found.via else "")
            + (f" [{detail}]" if detail else "")
            + "; go through the Env (kelpie.env) instead"
        )

    def findings(self) -> list[Finding]:
        """Every finding, in the order first seen."""
        return [self._findings[key] for key in self._order]

    def blocked(self) -> list[Finding]:
        """Only the findings that failed the run."""
        return [f for f in self.findings() if f.action == "blocked"]

    # -- file opens -------------------------------------------------------

    def _check_open(self, args: tuple[Any, ...]) -> None:
        path, mode, flags = args
        if path is None or isinstance(path, int):
            return
        real = os.path.realpath(os.fsdecode(path))
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        if _under(real, self._allowed_rw) or _is_bytecode_cache(real):
            return
        if not writing and (real.endswith(_CODE_SUFFIXES) or _under(real, self._allowed_read)):
            return
        self._block("open", detail=f"{'write' if writing else 'read'} {real}")

    def _check_fs_write(self, event: str, paths: list[Any]) -> None:
        for path in paths:
            if path is None or isinstance(path, int):
                continue
            real = os.path.realpath(os.fsdecode(path))
            if not (_under(real, self._allowed_rw) or _is_bytecode_cache(real)):
                self._block("filesystem", detail=f"{event} {real}")

    def _check_sqlite(self, database: Any) -> None:
        name = os.fsdecode(database) if isinstance(database, (str, bytes, os.PathLike)) else ""
        if name in {":memory:", ""} or name.startswith("file::memory:"):
            return
        real = os.path.realpath(name.removeprefix("file:").split("?", 1)[0])
        if not _under(real, self._allowed_rw):
            self._block("filesystem", detail=f"sqlite3.connect {real}")

    def _check_listing(self, event: str, path: Any) -> None:
        if isinstance(path, int):
            return
        real = os.path.realpath(os.fsdecode(path) if path is not None else os.curdir)
        # The import system lists the directories on sys.path to find modules.
        if _under(real, self._import_dirs) or _under(real, self._allowed_read):
            return
        self._block("filesystem", detail=f"{event} {real}")

    # -- patching ---------------------------------------------------------

    def _patch(self, owner: object, name: str, value: object) -> None:
        """Replaces `owner.name`; functions stay the originals for other threads of the host."""
        original = getattr(owner, name)
        self._saved.append((owner, name, original))
        if callable(value) and callable(original) and not isinstance(value, random.Random):
            sim_thread, replacement = self._thread, value

            def scoped(*args: Any, **kwargs: Any) -> Any:
                if threading.get_ident() != sim_thread:
                    return original(*args, **kwargs)
                return replacement(*args, **kwargs)

            value = scoped
        setattr(owner, name, value)

    def _virtual(self, api: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def virtual(*args: Any, **kwargs: Any) -> Any:
            self._note(api, "virtualized")
            return fn(*args, **kwargs)

        virtual.__name__ = api.rsplit(".", 1)[-1]
        return virtual

    def _blocker(self, api: str) -> Callable[..., Any]:
        def blocked(*args: Any, **kwargs: Any) -> Any:
            self._block(api)

        return blocked

    def _install_patches(self) -> None:
        wall_ns, mono = self._wall_ns, self._monotonic_s
        entropy = self._rng.fork("entropy")
        v = self._virtual
        self._patch(time, "time", v("time.time", lambda: wall_ns() / 1e9))
        self._patch(time, "time_ns", v("time.time_ns", wall_ns))
        self._patch(time, "monotonic", v("time.monotonic", mono))
        self._patch(time, "monotonic_ns", v("time.monotonic_ns", lambda: round(mono() * 1e9)))
        self._patch(time, "perf_counter", v("time.perf_counter", mono))
        self._patch(time, "perf_counter_ns", v("time.perf_counter_ns", lambda: round(mono() * 1e9)))
        self._patch(time, "sleep", self._blocker("time.sleep"))
        self._patch(uuid, "uuid4", v("uuid.uuid4", entropy.uuid4))
        self._patch(uuid, "uuid1", v("uuid.uuid1", self._uuid1(entropy)))
        self._patch(os, "urandom", v("os.urandom", entropy.randbytes))
        if hasattr(os, "getrandom"):
            self._patch(os, "getrandom", v("os.getrandom", lambda n, flags=0: entropy.randbytes(n)))
        self._patch_calendar_time()
        seed_method = random.Random.seed

        def seed(rnd: random.Random, a: Any = None, version: int = 2) -> None:
            if a is None:  # an unseeded Random draws OS entropy in C: seed it from the run
                self._note("random.Random()", "virtualized")
                a = entropy.getrandbits(64)
            seed_method(rnd, a, version)

        self._patch(random.Random, "seed", seed)
        self._patch(random, "_urandom", v("random.SystemRandom", entropy.randbytes))
        sysrand = _SeededSystemRandom(entropy.getrandbits(64), self._note_from_random, "secrets")
        self._patch(secrets, "_sysrand", sysrand)
        self._patch(secrets, "randbits", sysrand.getrandbits)
        self._patch(secrets, "choice", sysrand.choice)
        global_random = _SeededSystemRandom(
            entropy.getrandbits(64), self._note_from_random, "random"
        )
        for name in random.__all__:
            bound = getattr(random, name)
            if getattr(bound, "__self__", None) is random._inst:
                self._patch(random, name, getattr(global_random, name))
        self._patch(threading, "_start_new_thread", self._blocker("thread"))
        self._patch(_thread, "start_new_thread", self._blocker("thread"))
        self._patch(_thread, "start_new", self._blocker("thread"))
        for owner, name in _trio_hooks.thread_starters():
            self._patch(owner, name, self._blocker("thread"))

    def _patch_calendar_time(self) -> None:
        """time's calendar functions default to "now": make that the virtual now."""
        v, mono = self._virtual, self._monotonic_s

        def wall_s() -> float:
            return self._wall_ns() / 1e9

        def defaulting(original: Callable[[float], Any]) -> Callable[..., Any]:
            def call(secs: float | None = None) -> Any:
                return original(wall_s() if secs is None else secs)

            return call

        # Simulated nodes live in UTC, whatever the host's time zone.
        gmtime, strftime, asctime = time.gmtime, time.strftime, time.asctime
        self._patch(time, "gmtime", v("time.gmtime", defaulting(gmtime)))
        self._patch(time, "localtime", v("time.localtime", defaulting(gmtime)))
        self._patch(time, "mktime", v("time.mktime", lambda t: float(calendar.timegm(t))))
        localtime = gmtime

        def ctime_now(secs: float | None = None) -> str:
            return asctime(gmtime(wall_s() if secs is None else secs))

        self._patch(time, "ctime", v("time.ctime", ctime_now))

        def strftime_now(fmt: str, t: Any = None) -> str:
            return strftime(fmt, localtime(wall_s()) if t is None else t)

        def asctime_now(t: Any = None) -> str:
            return asctime(localtime(wall_s()) if t is None else t)

        def mono_ns() -> int:
            return round(mono() * 1e9)

        def clock_gettime_ns(clock_id: int) -> int:
            return self._wall_ns() if clock_id == time.CLOCK_REALTIME else mono_ns()

        def clock_gettime(clock_id: int) -> float:
            return clock_gettime_ns(clock_id) / 1e9

        self._patch(time, "strftime", v("time.strftime", strftime_now))
        self._patch(time, "asctime", v("time.asctime", asctime_now))
        for name in ("process_time", "thread_time"):
            self._patch(time, name, v(f"time.{name}", mono))
            self._patch(time, f"{name}_ns", v(f"time.{name}_ns", mono_ns))
        self._patch(time, "clock_gettime_ns", v("time.clock_gettime_ns", clock_gettime_ns))
        self._patch(time, "clock_gettime", v("time.clock_gettime", clock_gettime))

    def _uuid1(self, entropy: Rng) -> Callable[..., uuid.UUID]:
        """A version-1 UUID from the virtual wall clock and the run's entropy."""

        def uuid1(node: int | None = None, clock_seq: int | None = None) -> uuid.UUID:
            timestamp = self._wall_ns() // 100 + _UUID_EPOCH_OFFSET
            if clock_seq is None:
                clock_seq = entropy.getrandbits(14)
            if node is None:
                node = entropy.getrandbits(48) | (1 << 40)  # a random node has the multicast bit
            fields = (
                timestamp & 0xFFFFFFFF,
                (timestamp >> 32) & 0xFFFF,
                (timestamp >> 48) & 0x0FFF,
                (clock_seq >> 8) & 0x3F,
                clock_seq & 0xFF,
                node,
            )
            return uuid.UUID(fields=fields, version=1)

        return uuid1

    def _note_from_random(self, api: str) -> None:
        self._note(api, "virtualized")

    def __enter__(self) -> Sanitizer:
        if _HookState.active is not None:
            raise RuntimeError("a sanitizer is already active in this process")
        _install_audit_hook()
        try:
            self._install_patches()
        except BaseException:
            self.restore()
            raise
        _HookState.active = self
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Undoes every patch and deactivates; safe to call again, or after a failed enter."""
        if _HookState.active is self:
            _HookState.active = None
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        self._saved.clear()


def _install_roots() -> list[str]:
    """The interpreter's trees and the trees that `kelpie` and `scenarios` are imported from."""
    import kelpie

    roots = [sys.prefix, sys.base_prefix, sys.exec_prefix]
    roots.append(os.path.dirname(os.path.dirname(os.path.abspath(kelpie.__file__))))
    scenarios_file = getattr(sys.modules.get("scenarios"), "__file__", None)
    if isinstance(scenarios_file, str):
        roots.append(os.path.dirname(os.path.dirname(os.path.abspath(scenarios_file))))
    return roots


def _is_bytecode_cache(path: str) -> bool:
    """Python's own bytecode cache: `__pycache__` itself, and `.pyc` files (or their
    temporary `.pyc.<n>` names) inside it."""
    if os.path.basename(path) == "__pycache__":
        return True
    return os.path.basename(os.path.dirname(path)) == "__pycache__" and bool(
        _PYC_NAME.match(os.path.basename(path))
    )


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)
