"""Simulated runs in their own processes: one run, or a fork server for sweeps.

`python -m kelpie.sim.worker --scenario S --seed N` makes one run in this fresh
process and prints its `RunResult` as one line of JSON. The determinism check
uses it, so that each of its two runs starts from a brand-new interpreter.

`python -m kelpie.sim.worker --serve` is a fork server ("zygote") for sweeps:
it imports the simulator and every scenario once, then reads one job per line
on stdin (`{"scenario", "seed", "tail", "timeout_s", "trace_out"}` as JSON), forks a child
per job, and writes one line per job on stdout: `{"status": <wait status>, "result": <RunResult
JSON or null>, "error": <traceback or null>}`. A forked child is a fresh process
whose module state is the zygote's, which never runs a simulation itself, so
every child starts from the same state, at the cost of a fork instead of an
interpreter start (DESIGN.md §4, item 6).

Both are started with `PYTHONHASHSEED=0` by kelpie/sim/_sweep.py, exit 0 when
the run itself completed (pass or fail), and import neither click nor rich.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator


def run_job(
    scenario_ref: str, seed: int, *, trace_out: str | None, tail: int, timeout_s: float
) -> str:
    """One run of the scenario named `scenario_ref`, under the watchdog; its result as JSON."""
    import scenarios
    from kelpie.sim import run_scenario
    from kelpie.sim._watchdog import wall_timeout

    scenario = scenarios.get(scenario_ref)
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(trace_out, "w", encoding="utf-8")) if trace_out else None
        stack.enter_context(wall_timeout(timeout_s))
        result = run_scenario(
            scenario, seed, trace_sink=sink, trace_tail_len=tail, ref=scenario_ref
        )
    return result.to_json()


@contextlib.contextmanager
def protocol_stdout() -> Iterator[Callable[[str], None]]:
    """Keeps stdout for the result alone: within the block, anything printed goes to stderr.

    Yields a function that writes to the real stdout.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:

        def write(text: str) -> None:
            data = memoryview(text.encode("utf-8"))
            while data:
                data = data[os.write(saved, data) :]

        yield write
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _child(job: dict[str, object], write_fd: int) -> int:
    """The body of a forked child: one run, its result on `write_fd`."""
    try:
        trace_out = job.get("trace_out")
        result = run_job(
            str(job["scenario"]),
            int(str(job["seed"])),
            trace_out=None if trace_out is None else str(trace_out),
            tail=int(str(job["tail"])),
            timeout_s=float(str(job["timeout_s"])),
        )
        reply = {"result": result, "error": None}
        code = 0
    except BaseException:
        reply = {"result": None, "error": traceback.format_exc()}
        code = 1
    data = json.dumps(reply).encode("utf-8")
    view = memoryview(data)
    while view:
        view = view[os.write(write_fd, view) :]
    return code


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def serve() -> int:
    """The fork server loop (see the module docstring)."""
    import kelpie.sim  # noqa: F401 - imported once here, inherited by every child
    import scenarios

    scenarios.all_scenarios()  # import every scenario module before the first fork
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            # stdout carries the protocol: whatever the run prints goes to stderr.
            os.dup2(2, 1)
            code = _child(job, write_fd)
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)  # no atexit handlers, no flushing of the zygote's buffers
        os.close(write_fd)
        data = _read_all(read_fd)
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
        reply = json.loads(data) if data else {"result": None, "error": None}
        reply["status"] = status
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kelpie.sim.worker")
    parser.add_argument("--serve", action="store_true", help="run as a sweep's fork server")
    parser.add_argument("--scenario")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--trace-out", help="write every trace row to this file")
    parser.add_argument("--tail", type=int, default=40, help="trace rows kept for the report")
    parser.add_argument("--timeout", type=float, default=300, help="real seconds for the run")
    args = parser.parse_args(argv)
    if args.serve:
        return serve()
    if args.scenario is None or args.seed is None:
        parser.error("--scenario and --seed are required (or --serve)")
    with protocol_stdout() as write:
        write(
            run_job(
                args.scenario,
                args.seed,
                trace_out=args.trace_out,
                tail=args.tail,
                timeout_s=args.timeout,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
