"""The simulator: runs a workload on real trio, single-threaded, in virtual time, from one seed.

A `Simulation` applies the determinism recipe of DESIGN.md §4 around one
`trio.run`:

1. every scheduling decision goes through a `SchedulingController`
   (kelpie/sim/_scheduler.py, hooked in by kelpie/sim/_trio_hooks.py);
2. time is a `VirtualClock` that jumps to the next deadline, with a wall clock
   per simulated node that can skew, drift and jump;
3. the sanitizer (kelpie/sim/_sanitizer.py) virtualizes stray reads of time
   and entropy and blocks real I/O;
4. every step, spawn, exit, application event and fault firing goes into a
   hashed trace (kelpie/sim/_trace.py);
5. the garbage collector runs only at fixed step counts, over objects made
   during the run (older ones are frozen out), so finalizers run at the same
   points in every run.

`PYTHONHASHSEED=0` must be set before the interpreter starts (the CLI re-execs
itself to ensure it); everything else is reset at the start of each run, so
runs of the same seed in one process or in fresh processes give the same trace.

The run stops with a clear failure when the workload deadlocks (nothing can run
and no timeout is pending), when simulated time would pass `max_time_s`, or
when it takes more than `max_steps` scheduling steps. Stopping first cancels the
workload; tasks that ignore the cancellation are then aborted outright.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import re
import sys
import traceback
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import Any, Literal, TextIO

import attrs
import trio

from kelpie.env import Env, Rng
from kelpie.sim import _trio_hooks
from kelpie.sim._clock import NodeWallClock, VirtualClock
from kelpie.sim._faults import FaultConfig, SimFaults
from kelpie.sim._http import SimHttp
from kelpie.sim._llm import SimLLM
from kelpie.sim._network import SimNetwork
from kelpie.sim._nodes import CURRENT_NODE, SimNode
from kelpie.sim._pauses import NodePauses
from kelpie.sim._result import Failure, FailureKind, RunResult
from kelpie.sim._sanitizer import DeterminismViolation, Sanitizer
from kelpie.sim._scheduler import (
    ChoiceSource,
    FifoChoices,
    RandomChoices,
    ReplayChoices,
    SchedulingController,
)
from kelpie.sim._storage import SimStore
from kelpie.sim._trace import Trace, render_fields
from kelpie.sim._watchdog import RunTimedOut

_TRIO_DIR = os.path.dirname(trio.__file__) + os.sep
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MAIN_TASK_NAME = f"{__name__}._Run.main"
#: trio's own tasks: hashed into the trace, but never shown, reported or aborted.
_TRIO_SYSTEM_TASKS = frozenset({"<init>", "<TrioToken.run_sync_soon task>"})
_STEP_LIMIT_GRACE = 10_000
_DETAIL_LINES_MAX = 40


class CheckFailed(AssertionError):
    """A scenario's invariant does not hold: a safety violation."""


class SimulationAborted(BaseException):
    """Thrown into tasks that ignored the cancellation of a stopped run."""


Schedule = Literal["random", "fifo"] | tuple[int, ...]


@attrs.frozen
class SimConfig:
    """How to run one simulation. Everything that changes the trace is in here."""

    seed: int
    nodes: int = 1
    faults: FaultConfig = attrs.Factory(FaultConfig)
    max_time_s: float = 3600.0
    max_steps: int = 1_000_000
    #: "random" (seeded), "fifo", or a recorded choice sequence to replay.
    schedule: Schedule = "random"
    trace_tail_len: int = 40
    #: Paths the workload may open for reading and writing (real files are
    #: otherwise blocked inside a simulation).
    allowed_paths: tuple[str, ...] = ()
    gc_every_steps: int = 20_000

    def __attrs_post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"a simulation needs at least one node, got nodes={self.nodes}")
        if not (self.max_time_s > 0 and self.max_steps > 0):
            raise ValueError("max_time_s and max_steps must be positive")


class SimContext:
    """What a workload sees of the simulation: its nodes, their Envs, a random stream, events."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self.seed: int = run.config.seed
        self.nodes: tuple[SimNode, ...] = run.nodes
        #: The workload's own random stream (independent of the nodes' streams).
        self.rng: Rng = run.rng.fork("workload")

    @property
    def env(self) -> Env:
        """The first node's Env, for single-node workloads."""
        return self.nodes[0].env

    @property
    def store(self) -> SimStore:
        """The cluster's one simulated store, with this run's storage faults (made on first use)."""
        return self._run.get_store()

    @property
    def network(self) -> SimNetwork:
        """The run's simulated node network (each node's `env.network` is its endpoint).

        For explicit faults: `partition(...)`, `clog(...)`, `heal(quiet=True)`,
        `quiesce()`.
        """
        return self._run.network

    @property
    def pauses(self) -> NodePauses:
        """The run's node pauses: `pause(node, duration_s)`, and `quiesce()` for liveness."""
        return self._run.pauses

    @property
    def http(self) -> SimHttp:
        """The run's simulated outbound HTTP (each node's `env.http`): `register(host, handler)`."""
        return self._run.http

    def llm(self, host: str = "llm.sim") -> SimLLM:
        """The simulated LLM served at `host` (made and registered on first use).

        It injects the run's `FaultConfig(llm=...)` faults, each an `llm.fault`
        trace row. Point the SDKs at `http://<host>/v1` (OpenAI) or
        `http://<host>` (Anthropic).
        """
        return self._run.get_llm(host)

    def node(self, name: str) -> SimNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(
            f"no simulated node named {name!r}; nodes: {', '.join(n.name for n in self.nodes)}"
        )

    def spawn(
        self,
        nursery: trio.Nursery,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        node: SimNode | None = None,
        name: str | None = None,
    ) -> None:
        """Starts `fn(*args)` in `nursery`, as a task of `node` (the first node by default)."""
        (node or self.nodes[0]).start_soon(nursery, fn, *args, name=name)

    def emit(self, kind: str, **fields: object) -> None:
        """Adds an application event to the trace (workload-level, like `env.emit`)."""
        self._run.emit(CURRENT_NODE.get(), kind, fields)

    def phase(self, name: str) -> None:
        """Marks the start of a workload phase in the trace."""
        self._run.emit(CURRENT_NODE.get(), "phase", {"name": name})


class _TraceSink:
    """The simulated `EventSink` of one node: events become trace rows."""

    __slots__ = ("_node", "_run")

    def __init__(self, run: _Run, node: str) -> None:
        self._run = run
        self._node = node

    def emit(self, kind: str, fields: Any) -> None:
        self._run.emit(self._node, kind, fields)


class _Tracer(trio.abc.Instrument):
    """Trio instrument: numbers tasks, counts steps, and writes step rows to the trace."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self.labels: dict[trio.lowlevel.Task, str] = {}
        self._next_id = 0
        self.steps = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        name = _ADDRESS.sub("", task.name)
        if name == _MAIN_TASK_NAME:
            name = "<simulation>"
        label = f"#{self._next_id} {name}"
        self._next_id += 1
        self.labels[task] = label
        self._run.trace_task(task, label, "spawn")

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        run = self._run
        run.vclock.unarmed_idle = 0
        if self.steps > run.config.max_steps:
            run.on_step_limit(task, self.steps)
        if self.steps % run.config.gc_every_steps == 0:
            gc.collect()
        run.trace_task(task, self.labels.get(task, "#? <unknown>"), "step")

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self._run.trace_task(task, self.labels.pop(task, "#? <unknown>"), "exit")


class _Run:
    """The state of one simulated run (see `Simulation.run`)."""

    def __init__(self, config: SimConfig, trace_sink: TextIO | None) -> None:
        self.config = config
        self.rng = Rng(config.seed)
        self.trace = Trace(tail_len=config.trace_tail_len, sink=trace_sink)
        self.vclock = VirtualClock(
            limit_s=config.max_time_s,
            on_deadlock=self.on_deadlock,
            on_limit=self.on_time_limit,
            on_stuck_unarmed=self.on_stuck_unarmed,
        )
        self.controller = SchedulingController(self._choice_source())
        self.faults = SimFaults(self.rng.fork("faults"), config.faults, self._on_buggify)
        self.tracer = _Tracer(self)
        self.pauses = NodePauses(
            self.rng.fork("pauses"), config.faults.pauses, on_fault=self._on_pause
        )
        self.network = SimNetwork(
            self.rng.fork("network"),
            config.faults.network,
            on_fault=self._on_network_fault,
            pauses=self.pauses,
        )
        self.http = SimHttp(self.rng.fork("http"), pauses=self.pauses)
        self._llms: dict[str, SimLLM] = {}
        self.nodes = tuple(self._make_node(i) for i in range(config.nodes))
        self.sanitizer = Sanitizer(
            rng=self.rng.fork("sanitizer"),
            wall_ns=self._current_wall_ns,
            monotonic_s=self.vclock.current_time,
            allowed_paths=config.allowed_paths,
        )
        self.failure: Failure | None = None
        self._store: SimStore | None = None
        self._root: trio.CancelScope | None = None
        self._stopping = False
        self._escalations = 0

    # -- construction ------------------------------------------------------

    def _choice_source(self) -> ChoiceSource:
        schedule = self.config.schedule
        if schedule == "random":
            return RandomChoices(self.rng.fork("schedule"))
        if schedule == "fifo":
            return FifoChoices()
        assert isinstance(schedule, tuple)
        return ReplayChoices(schedule)

    def _make_node(self, index: int) -> SimNode:
        name = f"n{index + 1}"
        clock_rng = self.rng.fork(f"clock:{name}")
        spec = self.config.faults.clock
        skew_ns = clock_rng.randint(-spec.skew_max_ms, spec.skew_max_ms) * 1_000_000
        drift_ppm = clock_rng.uniform(-spec.drift_max_ppm, spec.drift_max_ppm)
        clock = NodeWallClock(
            name=name,
            vclock=self.vclock,
            rng=clock_rng.fork("jumps"),
            skew_ns=skew_ns,
            drift_ppm=drift_ppm,
            jump_rate_per_s=spec.jump_rate_per_s,
            jump_max_ms=spec.jump_max_ms,
            on_jump=self._on_clock_jump,
        )
        env = Env(
            clock=clock,
            rng=self.rng.fork(f"node:{name}"),
            faults=self.faults,
            events=_TraceSink(self, name),
            node=name,
            network=self.network.endpoint(name),
            http=self.http,
        )
        return SimNode(name=name, env=env, clock=clock)

    # -- trace -------------------------------------------------------------

    def _current_label(self) -> str:
        try:
            task = trio.lowlevel.current_task()
        except RuntimeError:
            return "-"
        return self.tracer.labels.get(task, "-")

    def trace_task(self, task: trio.lowlevel.Task, label: str, kind: str) -> None:
        node = task.context.get(CURRENT_NODE, "-")
        # trio's own tasks are hashed, but kept out of the tail shown to people.
        system = task.name in _TRIO_SYSTEM_TASKS
        self.trace.add(self.vclock.now_s, node, label, kind, in_tail=not system)

    def emit(self, node: str, kind: str, fields: Any) -> None:
        # Memory addresses in a repr are never meaningful and differ between processes.
        detail = _ADDRESS.sub("", render_fields(dict(fields)))
        self.trace.add(self.vclock.now_s, node, self._current_label(), kind, detail)

    def get_store(self) -> SimStore:
        if self._store is None:
            self._store = SimStore(
                self.rng.fork("storage"),
                self.config.faults.storage,
                on_fault=self._on_storage_fault,
                pauses=self.pauses,
            )
        return self._store

    def get_llm(self, host: str) -> SimLLM:
        llm = self._llms.get(host)
        if llm is None:
            llm = self._llms[host] = SimLLM(
                self.rng.fork(f"llm:{host}"),
                faults=self.config.faults.llm,
                on_fault=self._on_llm_fault,
            )
            self.http.register(host, llm)
        return llm

    def _on_llm_fault(self, kind: str, fields: dict[str, object]) -> None:
        self.emit(CURRENT_NODE.get(), "llm.fault", {"kind": kind, **fields})

    def _on_storage_fault(self, kind: str, fields: dict[str, object]) -> None:
        self.emit(CURRENT_NODE.get(), "storage.fault", {"kind": kind, **fields})

    def _on_network_fault(self, kind: str, fields: dict[str, object]) -> None:
        self.emit(CURRENT_NODE.get(), "network.fault", {"kind": kind, **fields})

    def _on_pause(self, kind: str, fields: dict[str, object]) -> None:
        self.emit(CURRENT_NODE.get(), "node.pause", {"kind": kind, **fields})

    def _on_buggify(self, site: str) -> None:
        self.emit(CURRENT_NODE.get(), "buggify", {"site": site})

    def _on_clock_jump(self, node: str, delta_ns: int) -> None:
        self.emit(node, "clock.jump", {"delta_ms": delta_ns / 1e6})

    def _current_wall_ns(self) -> int:
        name = CURRENT_NODE.get()
        for node in self.nodes:
            if node.name == name:
                return node.clock.wall_ns()
        return self.nodes[0].clock.wall_ns()

    # -- stopping ----------------------------------------------------------

    def _stop(self, failure: Failure) -> None:
        if self.failure is None:
            self.failure = failure
        if not self._stopping:
            self._stopping = True
            assert self._root is not None
            self._root.cancel()

    def _escalate(self) -> None:
        """The run was stopped, yet tasks are still stuck: abort them, then end the run.

        First every blocked workload task is interrupted through trio's abort
        protocol (shields do not stop it); if the run is stuck even so, the clock
        is poisoned, which ends the trio run itself.
        """
        self._escalations += 1
        if self._escalations > 1:
            self.vclock.poison(SimulationAborted("tasks survived cancellation and an abort"))
            return
        aborted = SimulationAborted("the simulation was stopped")
        for task in _walk_tasks(_root_task(), self.tracer.labels):
            if task.name not in _TRIO_SYSTEM_TASKS:
                _trio_hooks.abort_blocked_task(task, aborted)

    def on_deadlock(self) -> None:
        if self._stopping:
            self._escalate()
            return
        now = self.vclock.current_time()
        self._stop(
            Failure(
                FailureKind.DEADLOCK,
                f"deadlock at t={now:g}s: no task can run and no timeout is pending",
                tuple(_describe_blocked(self.tracer.labels)),
            )
        )

    def on_stuck_unarmed(self) -> None:
        """Idle with nothing pending outside the workload phases: end the run as a deadlock."""
        if self.failure is None:
            self.failure = Failure(
                FailureKind.DEADLOCK,
                f"deadlock at t={self.vclock.now_s:g}s outside the workload: a task it left "
                "behind (a system task?) waits with no timeout pending",
                tuple(_describe_blocked(self.tracer.labels)),
            )
        self.vclock.poison(SimulationAborted("stuck outside the workload"))

    def on_time_limit(self, deadline: float) -> None:
        if self._stopping:
            self._escalate()
            return
        self._stop(
            Failure(
                FailureKind.TIME_LIMIT,
                f"simulated time limit: the next deadline, t={deadline:g}s, is past "
                f"max_time_s={self.config.max_time_s:g}",
                tuple(_describe_blocked(self.tracer.labels)),
            )
        )

    def on_step_limit(self, task: trio.lowlevel.Task, steps: int) -> None:
        if steps > self.config.max_steps + 2 * _STEP_LIMIT_GRACE:
            self.vclock.poison(SimulationAborted("tasks survived the step limit's abort"))
            return
        if steps > self.config.max_steps + _STEP_LIMIT_GRACE:
            _trio_hooks.throw_at_next_step(task, SimulationAborted("step limit"))
            return
        self._stop(
            Failure(
                FailureKind.STEP_LIMIT,
                f"step limit: more than max_steps={self.config.max_steps} scheduling steps "
                f"(t={self.vclock.current_time():g}s)",
            )
        )

    # -- the run -----------------------------------------------------------

    async def main(self, workload: Callable[[SimContext], Awaitable[None]]) -> None:
        ctx = SimContext(self)
        asyncgens = _AsyncGenOrder()
        with trio.CancelScope() as root:
            self._root = root
            self.vclock.armed = True
            try:
                with self.sanitizer:
                    try:
                        await workload(ctx)
                    finally:
                        await asyncgens.close_remaining()
            finally:
                self.vclock.armed = False

    def execute(self, workload: Callable[[SimContext], Awaitable[None]]) -> BaseException | None:
        # Objects from before the run are frozen out of the collector, and it runs
        # only at fixed step counts, so finalizers run at the same points every time.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        gc.freeze()
        try:
            with _trio_hooks.deterministic_scheduling(self.controller.order_batch):
                trio.run(
                    self.main,
                    workload,
                    clock=self.vclock.trio_clock,
                    instruments=[self.tracer],
                    strict_exception_groups=True,
                )
        except KeyboardInterrupt:
            raise  # the person at the keyboard wants out, not a crash report
        except trio.TrioInternalError as exc:
            # The run loop itself died (the last-resort stop): release its tasks.
            _trio_hooks.discard_tasks(list(self.tracer.labels))
            return exc
        except BaseException as exc:
            return exc
        finally:
            # Normally undone when the workload ends; but a run that died inside
            # trio itself never got there, and must not leave the process patched.
            self.sanitizer.restore()
            gc.unfreeze()
            if gc_was_enabled:
                gc.enable()
        return None

    def result(self, scenario: str, error: BaseException | None) -> RunResult:
        failure = self.failure
        blocked = self.sanitizer.blocked()
        if failure is None and error is not None:
            failure = _classify(error)
        elif failure is not None and error is not None and not _only_aborts(error):
            # Something went wrong while stopping, too: keep it in the report.
            later = _classify(error)
            failure = attrs.evolve(
                failure,
                details=(*failure.details, f"then, while stopping: {later.message}"),
            )
        if (failure is None or failure.kind is FailureKind.CRASH) and blocked:
            failure = Failure(
                FailureKind.SANITIZER,
                f"the workload reached outside the simulation: {blocked[0].describe()}",
                tuple(f.describe() for f in blocked),
            )
        return RunResult(
            scenario=scenario,
            seed=self.config.seed,
            failure=failure,
            trace_hash=self.trace.hexdigest(),
            trace_rows=self.trace.rows,
            steps=self.tracer.steps,
            sim_time_s=self.vclock.now_s,
            schedule_batches=self.controller.batches,
            schedule_choices=len(self.controller.choices),
            schedule_deviations=self.controller.deviations,
            faults=self.config.faults.describe(),
            schedule=self.config.schedule if isinstance(self.config.schedule, str) else "replay",
            trace_tail=tuple(self.trace.tail()),
            findings=tuple(self.sanitizer.findings()),
            buggify=tuple(self.faults.report()),
        )


class Simulation:
    """Runs workloads deterministically from a seed. See the module docstring."""

    def __init__(self, config: SimConfig, *, trace_sink: TextIO | None = None) -> None:
        self.config = config
        self._trace_sink = trace_sink
        #: The recorded scheduling choices of the last run (replay them with
        #: `SimConfig(schedule=tuple(choices))`).
        self.choices: tuple[int, ...] = ()

    def run(
        self,
        workload: Callable[[SimContext], Awaitable[None]],
        *,
        scenario: str = "<workload>",
    ) -> RunResult:
        """Runs `workload(ctx)` to completion (or failure) and reports the outcome."""
        run = _Run(self.config, self._trace_sink)
        error = run.execute(workload)
        self.choices = tuple(run.controller.choices)
        return run.result(scenario, error)


# -- failure reports ----------------------------------------------------------


class _AsyncGenOrder:
    """Closes the workload's unfinished async generators in creation order.

    trio closes async generators still alive at the end of a run by iterating a
    set, i.e. in memory-address order, which differs between runs. This records
    the order in which the workload's generators first ran (wrapping trio's own
    `firstiter` hook) and closes the survivors in that order before the workload
    phase ends, so trio finds nothing left to close.
    """

    def __init__(self) -> None:
        self._order: weakref.WeakKeyDictionary[AsyncGenerator[Any, Any], int] = (
            weakref.WeakKeyDictionary()
        )
        self._counter = itertools.count()
        hooks = sys.get_asyncgen_hooks()
        trio_firstiter = hooks.firstiter

        def firstiter(agen: AsyncGenerator[Any, Any]) -> None:
            self._order[agen] = next(self._counter)
            if trio_firstiter is not None:
                trio_firstiter(agen)

        sys.set_asyncgen_hooks(firstiter=firstiter, finalizer=hooks.finalizer)

    async def close_remaining(self) -> None:
        """Closes survivors in creation order, each as trio would: shielded and cancelled."""
        survivors = sorted(self._order.items(), key=lambda item: item[1])
        for agen, _ in survivors:
            if agen.ag_frame is None or agen.ag_running:  # type: ignore[attr-defined]
                continue
            with trio.CancelScope(shield=True) as scope:
                scope.cancel()  # like trio: a finally block may not block
                with contextlib.suppress(Exception, SimulationAborted):
                    await agen.aclose()


def _only_aborts(error: BaseException) -> bool:
    """True when `error` holds nothing but the simulator's own stop signals."""
    return all(isinstance(leaf, (SimulationAborted, trio.Cancelled)) for leaf in _leaves(error))


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    elif isinstance(exc, trio.TrioInternalError) and exc.__cause__ is not None:
        yield from _leaves(exc.__cause__)
    else:
        yield exc


_SIM_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _format(exc: BaseException) -> tuple[str, ...]:
    """The traceback of `exc` without the simulator's and trio's own frames."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith((_TRIO_DIR, _SIM_DIR))
    ]
    lines = "".join(traceback.format_list(frames)).rstrip().splitlines()
    lines += "".join(traceback.format_exception_only(exc)).rstrip().splitlines()
    return tuple(lines[-_DETAIL_LINES_MAX:])


def _classify(error: BaseException) -> Failure:
    leaves = list(_leaves(error))
    for kind, types in (
        (FailureKind.HANG, (RunTimedOut,)),
        (FailureKind.SANITIZER, (DeterminismViolation,)),
        (FailureKind.CHECK, (AssertionError,)),
    ):
        for leaf in leaves:
            if isinstance(leaf, types):
                message = str(leaf) or type(leaf).__name__
                if kind is FailureKind.CHECK:
                    message = f"{type(leaf).__name__}: {message}"
                return Failure(kind, message, _format(leaf))
    leaf = leaves[0]
    return Failure(FailureKind.CRASH, f"{type(leaf).__name__}: {leaf}", _format(leaf))


def _root_task() -> trio.lowlevel.Task:
    root = trio.lowlevel.current_root_task()
    assert root is not None, "called outside a running simulation"
    return root


def _walk_tasks(
    task: trio.lowlevel.Task, labels: dict[trio.lowlevel.Task, str]
) -> Iterator[trio.lowlevel.Task]:
    """The task tree under `task`, children in spawn order (never in set order)."""
    yield task
    for nursery in task.child_nurseries:
        for child in sorted(nursery.child_tasks, key=lambda t: _spawn_index(labels, t)):
            yield from _walk_tasks(child, labels)


def _spawn_index(labels: dict[trio.lowlevel.Task, str], task: trio.lowlevel.Task) -> int:
    label = labels.get(task)
    return int(label[1 : label.index(" ")]) if label else -1


def _primitive(qualnames: list[str]) -> str:
    """The trio primitive a task waits in: its first public method (Lock.acquire, Event.wait)."""
    for name in qualnames:
        owner, _, method = name.rpartition(".")
        if owner and not method.startswith("_") and "<" not in owner:
            return f"trio {name}"
    return f"trio {qualnames[0]}" if qualnames else "?"


def _short_path(path: str) -> str:
    cwd = os.getcwd() + os.sep
    return path[len(cwd) :] if path.startswith(cwd) else path


def _describe_blocked(labels: dict[trio.lowlevel.Task, str]) -> list[str]:
    """One line per waiting workload task: what it waits on, and where in its own code."""
    lines = []
    for task in _walk_tasks(_root_task(), labels):
        if task.name in _TRIO_SYSTEM_TASKS or task not in labels:
            continue
        user_site = "?"
        trio_frames: list[str] = []
        for frame, lineno in task.iter_await_frames():
            filename = frame.f_code.co_filename
            if filename.startswith(_TRIO_DIR):
                trio_frames.append(frame.f_code.co_qualname)
            else:
                user_site = f"{_short_path(filename)}:{lineno} in {frame.f_code.co_name}"
                trio_frames = []
        waits_on = _primitive(trio_frames)
        node = task.context.get(CURRENT_NODE, "-")
        lines.append(f"{labels[task]} (node {node}) waits in {waits_on}, at {user_site}")
    return lines
