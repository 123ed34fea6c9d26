"""A throwaway PostgreSQL server for tests and benchmarks: initdb, start, kill, restart, stop.

`PgServer.start()` finds the server binaries (`initdb` on PATH, or Debian's
/usr/lib/postgresql/<version>/bin, newest first), creates a cluster in a fresh
temporary directory and starts `postgres` on a free 127.0.0.1 port with trust
authentication, so `server.url` needs no password. Durability is the server's
default: fsync on, synchronous_commit on, full_page_writes on (the crash tests
rely on it). Only initdb runs with --no-sync: a cluster nobody has written to yet
has nothing to lose.

PostgreSQL refuses to run as root. When this process is root, every server
process runs as the `postgres` OS user (Debian's package creates it), and the
cluster's directory is owned by that user; otherwise they run as the current
user.

The postmaster is started directly (not through pg_ctl) in its own process
group, so `kill()` can SIGKILL the postmaster and every backend at once (a real
crash: the next `restart()` runs WAL recovery), and `stop()` is a fast shutdown.

`PgUnavailable` means no server could be started here; its message says why.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import attrs
import psycopg

#: How long a start (or a restart, which may replay WAL) may take.
START_TIMEOUT_S = 60.0

#: How long a fast shutdown may take before the server is killed.
STOP_TIMEOUT_S = 30.0

#: The database superuser initdb creates (no password: trust authentication).
SUPERUSER = "kelpie"

#: Server settings: enough connections for many stores at once, predicate-lock room for
#: wide range reads under SERIALIZABLE, and quiet logs.
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "300",
    "max_pred_locks_per_transaction": "256",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",
    "logging_collector": "off",
}


class PgUnavailable(Exception):
    """No PostgreSQL server can be started on this machine; the message says why."""


def find_bindir() -> Path:
    """The directory of the server binaries (initdb, postgres), or PgUnavailable."""
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(Path(p) for p in debian)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise PgUnavailable(
        "no PostgreSQL server binaries: initdb is not on PATH and /usr/lib/postgresql/*/bin "
        "has none (install Debian's `postgresql` package, or set KELPIE_POSTGRES_URL)"
    )


def _ephemeral_low() -> int:
    """The first port the kernel hands out to outgoing connections (32768 by default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_port() -> int:
    """A free 127.0.0.1 port below the ephemeral range.

    The server keeps its port across `kill()` and `restart()`. A port from the
    ephemeral range could meanwhile become the local end of some client's
    connection (the crash tests open many), and the restart would fail to bind.
    """
    low = max(1024, _ephemeral_low() - 12_000)
    high = _ephemeral_low()
    start = low + (os.getpid() * 7919 + int(time.monotonic_ns() // 1000)) % (high - low)
    for i in range(high - low):
        port = low + (start - low + i) % (high - low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise PgUnavailable(f"no free 127.0.0.1 port in {low}..{high - 1}")


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is in process group `pgid`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@attrs.define
class _RunAs:
    """The OS user the server runs as: `postgres` when we are root, else ourselves."""

    uid: int
    gid: int
    name: str

    @classmethod
    def for_server(cls) -> _RunAs:
        if os.geteuid() != 0:
            me = pwd.getpwuid(os.geteuid())
            return cls(me.pw_uid, me.pw_gid, me.pw_name)
        try:
            pg = pwd.getpwnam("postgres")
        except KeyError:
            raise PgUnavailable(
                "running as root, and PostgreSQL refuses to run as root, but there is no "
                "`postgres` OS user to run it as (Debian's postgresql package creates one)"
            ) from None
        return cls(pg.pw_uid, pg.pw_gid, pg.pw_name)

    def popen_kwargs(self) -> dict[str, object]:
        if self.uid == os.geteuid():
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


@attrs.define
class PgServer:
    """One running throwaway cluster (see the module docstring)."""

    bindir: Path
    root: Path  # the temporary directory: data/, the socket, the log
    port: int
    run_as: _RunAs
    process: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    @property
    def url(self) -> str:
        """A libpq URL of the `postgres` database, as the superuser (trust: no password)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int:
        """The postmaster's process id."""
        assert self.process is not None, "the server is not running"
        return self.process.pid

    @classmethod
    def start(cls) -> PgServer:
        """Creates a cluster in a new temporary directory and starts it, or PgUnavailable."""
        bindir = find_bindir()
        run_as = _RunAs.for_server()
        root = Path(tempfile.mkdtemp(prefix="kelpie-pg-"))
        server = cls(bindir=bindir, root=root, port=_free_port(), run_as=run_as)
        try:
            os.chown(root, run_as.uid, run_as.gid)
            server._initdb()
            server._launch()
        except BaseException:
            server.stop()
            raise
        return server

    def _initdb(self) -> None:
        command = [
            str(self.bindir / "initdb"),
            "--pgdata",
            str(self.data_dir),
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
            "--no-instructions",
        ]
        done = subprocess.run(
            command,
            capture_output=True,
            check=False,
            cwd=self.root,
            **self.run_as.popen_kwargs(),  # type: ignore[call-overload]
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise PgUnavailable(f"initdb failed (exit {done.returncode}):\n{output[-2000:]}")

    def _launch(self) -> None:
        """Starts the postmaster in its own process group and waits until it accepts queries."""
        command = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        command += ["-c", f"unix_socket_directories={self.root}"]
        for name, value in SETTINGS.items():
            command += ["-c", f"{name}={value}"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.root,
                start_new_session=True,
                **self.run_as.popen_kwargs(),  # type: ignore[call-overload]
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last_error = ""
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise PgUnavailable(
                    f"postgres exited with {self.process.returncode} while starting:\n"
                    f"{self.log_tail()}"
                )
            try:
                with psycopg.connect(self.url, connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
            except psycopg.OperationalError as exc:
                last_error = str(exc).strip()
            else:
                return
            time.sleep(0.02)
        raise PgUnavailable(
            f"postgres did not accept connections within {START_TIMEOUT_S:.0f} s "
            f"(last error: {last_error}):\n{self.log_tail()}"
        )

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's log (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no server log: {exc})"

    def kill(self) -> None:
        """SIGKILLs the postmaster and every backend at once (a crash), and reaps them."""
        assert self.process is not None, "the server is not running"
        pgid = self.process.pid  # the postmaster leads its group (start_new_session)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.process.wait()
        self.process = None
        self._wait_group_gone(pgid)

    def _wait_group_gone(self, pgid: int) -> None:
        """Waits for orphaned backends (reparented, so not ours to reap) to exit."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.01)

    def restart(self) -> None:
        """Starts the server again on the same port and data (after `kill()` or `stop()`)."""
        assert self.process is None, "the server is still running"
        self._launch()

    def stop(self) -> None:
        """Shuts the server down (fast shutdown, then SIGKILL) and deletes its directory."""
        try:
            if self.process is not None:
                self.process.send_signal(signal.SIGINT)  # fast shutdown
                try:
                    self.process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.kill()
                self.process = None
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
