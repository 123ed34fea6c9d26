"""The `kelpie` command line: `kelpie sim`, `kelpie sweep`, `kelpie scenarios`, `kelpie node`.

`kelpie` always runs with `PYTHONHASHSEED=0` (it re-executes itself to get it,
DESIGN.md §4), so that a run in this process hashes exactly like a sweep
worker's. `DST_SEED` is honoured wherever a seed is taken.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import click
import trio
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Logs and CI are not terminals: give tables room instead of rich's 80 columns.
SEED_MAX = 2**64 - 1

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _scenario_names(names: Sequence[str], *, default_all: bool) -> list[str]:
    import scenarios

    known = scenarios.all_scenarios()
    if not names:
        if default_all:
            return scenarios.default_names()
        raise click.UsageError(f"name a scenario with --scenario; known: {', '.join(known)}")
    for name in names:
        if ":" in name:
            try:
                scenarios.get(name)
            except KeyError as exc:
                raise click.BadParameter(str(exc.args[0]), param_hint="--scenario") from None
    unknown = [n for n in names if n not in known and ":" not in n]
    if unknown:
        raise click.BadParameter(
            f"unknown scenario {', '.join(unknown)}; known: {', '.join(known)}",
            param_hint="--scenario",
        )
    return list(dict.fromkeys(names))


def _random_seed() -> int:
    return int.from_bytes(os.urandom(4), "big")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kelpie")
def cli() -> None:
    """Kelpie: an agent runtime with a deterministic simulator."""


@cli.command()
def scenarios() -> None:
    """Lists the simulation scenarios."""
    import scenarios as registry

    table = Table("scenario", "nodes", "faults", "summary", show_edge=False)
    for name, scenario in registry.all_scenarios().items():
        summary = scenario.summary + (" [planted bug]" if scenario.planted_bug else "")
        table.add_row(name, str(scenario.nodes), scenario.faults.describe(), escape(summary))
    console.print(table)


@cli.command()
@click.option(
    "--scenario",
    "scenario_names",
    multiple=True,
    metavar="NAME",
    help="Scenario to run (repeatable with --check-determinism; default: all).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0, max=SEED_MAX),
    envvar="DST_SEED",
    show_envvar=True,
    help="Seed of the run (random and printed when omitted).",
)
@click.option(
    "--check-determinism",
    is_flag=True,
    help="Run each seed twice in fresh processes and compare their traces.",
)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --check-determinism: how many seeds, from --seed (default 0) upwards.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="With --check-determinism: parallel seeds (default: one per core).",
)
@click.option(
    "--schedule",
    type=click.Choice(["random", "fifo"]),
    default="random",
    show_default=True,
    help="Scheduling: seeded random order, or first-in-first-out.",
)
@click.option("--trace", "show_trace", is_flag=True, help="Print the trace tail on success too.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    hidden=True,
    help="Print the run's result as one line of JSON (for the determinism check).",
)
@click.option(
    "--trace-out",
    type=click.Path(dir_okay=False, writable=True),
    help="Write every trace row to this file.",
)
@click.option(
    "--tail", type=click.IntRange(min=1), default=40, show_default=True, help="Trace rows to show."
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=300,
    show_default=True,
    help="Real seconds before a run counts as hung (a task that never yields).",
)
def sim(
    scenario_names: tuple[str, ...],
    seed: int | None,
    check_determinism: bool,
    seeds: int,
    jobs: int | None,
    schedule: str,
    show_trace: bool,
    as_json: bool,
    trace_out: str | None,
    tail: int,
    timeout: float,
) -> None:
    """Runs one scenario with one seed, in this process, and reports the outcome.

    On failure it prints the trace tail, what failed and the command that
    reproduces it, and exits 1.
    """
    if not check_determinism and (seeds != 1 or jobs is not None):
        raise click.UsageError(
            "--seeds and --jobs go with --check-determinism; "
            "for many seeds in parallel use `kelpie sweep`"
        )
    if check_determinism:
        names = _scenario_names(scenario_names, default_all=True)
        _check_determinism(names, seed or 0, seeds, jobs, timeout)
        return
    names = _scenario_names(scenario_names, default_all=False)
    if len(names) != 1:
        raise click.UsageError("a single run takes exactly one --scenario")
    import scenarios as registry
    from kelpie.sim import run_scenario
    from kelpie.sim._report import git_commit, print_result
    from kelpie.sim._watchdog import wall_timeout
    from kelpie.sim.worker import protocol_stdout

    if seed is None:
        seed = _random_seed()
        console.print(f"no --seed or DST_SEED given: using seed {seed}")
    scenario = registry.get(names[0])
    mode: Literal["random", "fifo"] = "fifo" if schedule == "fifo" else "random"
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(trace_out, "w", encoding="utf-8")) if trace_out else None
        write_json = stack.enter_context(protocol_stdout()) if as_json else None
        with wall_timeout(timeout):
            result = run_scenario(
                scenario, seed, schedule=mode, trace_sink=sink, trace_tail_len=tail, ref=names[0]
            )
        if write_json is not None:
            write_json(result.to_json() + "\n")
            return
    print_result(console, result, commit=git_commit(), show_trace=show_trace)
    if not result.ok:
        sys.exit(1)


def _check_determinism(
    names: list[str], first_seed: int, seeds: int, jobs: int | None, timeout: float
) -> None:
    from kelpie.sim._report import git_commit, reproduce_command
    from kelpie.sim._sweep import (
        DeterminismReport,
        Job,
        check_determinism_many,
        default_jobs,
    )

    work = [Job(name, seed) for name in names for seed in range(first_seed, first_seed + seeds)]
    diverged: list[DeterminismReport] = []
    with _progress() as progress:
        bar = progress.add_task("determinism", total=len(work), status="")

        def done(report: DeterminismReport) -> None:
            if not report.ok:
                diverged.append(report)
            progress.update(
                bar,
                advance=1,
                status=f"[red]{len(diverged)} diverged[/]" if diverged else "[green]identical[/]",
            )

        trio.run(
            lambda: check_determinism_many(
                work, parallel=jobs or default_jobs(), timeout_s=timeout, on_report=done
            )
        )
    if not diverged:
        console.print(
            f"[bold green]deterministic[/]: {len(work)} runs of "
            f"{', '.join(names)} gave identical traces twice each in fresh processes"
        )
        return
    commit = git_commit()
    for report in sorted(diverged, key=lambda r: (r.job.scenario, r.job.seed)):
        job = report.job
        console.print(
            f"[bold red]DIVERGED[/] {job.scenario} seed {job.seed}: hashes "
            f"{report.first.trace_hash or '-'} vs {report.second.trace_hash or '-'}"
        )
        console.print(f"  faults    {escape(report.first.faults)}")
        console.print(f"  commit    {commit}")
        broken = False
        for label, result in (
            ("run 1 (sweep path)", report.first),
            ("run 2 (kelpie sim)", report.second),
        ):
            if result.failure is not None and not result.trace_hash:
                broken = True
                console.print(f"  {label} produced no trace: {escape(result.failure.message)}")
                for line in result.failure.details[-10:]:
                    console.print(f"    {escape(line)}")
        if report.divergence is None or broken:
            continue
        console.print(f"  first divergent trace row: #{report.divergence}")
        for label, rows in (
            ("run 1 (sweep path)", report.rows_first),
            ("run 2 (kelpie sim)", report.rows_second),
        ):
            console.print(f"  {label}:")
            for row in rows:
                console.print(f"    {escape(row.line())}")
        console.print(
            f"  reproduce: {escape(reproduce_command(job.scenario, job.seed))} --check-determinism"
        )
    sys.exit(1)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


@cli.command()
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Seeds per scenario.",
)
@click.option(
    "--first-seed",
    type=click.IntRange(min=0, max=SEED_MAX),
    envvar="DST_SEED",
    default=0,
    show_default=True,
    show_envvar=True,
    help="The first seed of the range.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Parallel worker processes (default: one per core).",
)
@click.option(
    "--scenario",
    "scenario_names",
    multiple=True,
    metavar="NAME",
    help="Scenario to sweep (repeatable; default: every scenario without a planted bug).",
)
@click.option(
    "--budget",
    type=click.FloatRange(min=0),
    default=None,
    help="Stop starting new seeds after this many real seconds.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=300,
    show_default=True,
    help="Real seconds before one seed's run counts as hung.",
)
def sweep(
    seeds: int,
    first_seed: int,
    jobs: int | None,
    scenario_names: tuple[str, ...],
    budget: float | None,
    timeout: float,
) -> None:
    """Runs many seeds, one fresh process each, in parallel; exits 1 if any fails."""
    from kelpie.sim._report import git_commit, print_result
    from kelpie.sim._sweep import Job, Outcome, default_jobs, run_jobs

    names = _scenario_names(scenario_names, default_all=True)
    work = [Job(name, seed) for seed in range(first_seed, first_seed + seeds) for name in names]
    parallel = jobs or default_jobs()
    console.print(
        f"sweeping {', '.join(names)}: seeds {first_seed}..{first_seed + seeds - 1}, "
        f"{parallel} parallel worker(s)" + (f", budget {budget:g}s" if budget else "")
    )
    failures: list[Outcome] = []
    with _progress() as progress:
        bar = progress.add_task("sweep", total=len(work), status="")

        def done(outcome: Outcome) -> None:
            if not outcome.result.ok:
                failures.append(outcome)
            progress.update(
                bar,
                advance=1,
                status=f"[red]{len(failures)} failed[/]" if failures else "[green]all passed[/]",
            )

        outcomes = trio.run(
            lambda: run_jobs(
                work, parallel=parallel, timeout_s=timeout, budget_s=budget, on_outcome=done
            )
        )
    _print_summary(outcomes, names)
    if len(outcomes) < len(work):
        console.print(f"budget spent: {len(work) - len(outcomes)} of {len(work)} runs not started")
    if failures:
        commit = git_commit()
        for outcome in sorted(failures, key=lambda o: (o.job.scenario, o.job.seed)):
            console.rule()
            print_result(console, outcome.result, commit=commit)
        console.rule()
        console.print(f"[bold red]{len(failures)} of {len(outcomes)} runs failed[/]")
        sys.exit(1)


def _print_summary(outcomes: Sequence[object], names: list[str]) -> None:
    from kelpie.sim._sweep import Outcome

    by_name: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        assert isinstance(outcome, Outcome)
        by_name[outcome.job.scenario].append(outcome)
    table = Table(
        "scenario",
        "runs",
        "passed",
        "failed",
        "mean steps",
        "mean sim time",
        "mean wall",
        title="sweep summary",
        title_justify="left",
    )
    for name in names:
        runs = by_name.get(name, [])
        failed = sum(1 for o in runs if not o.result.ok)
        count = max(1, len(runs))
        table.add_row(
            name,
            str(len(runs)),
            str(len(runs) - failed),
            f"[red]{failed}[/]" if failed else "0",
            f"{sum(o.result.steps for o in runs) / count:,.0f}",
            f"{sum(o.result.sim_time_s for o in runs) / count:.3g}s",
            f"{sum(o.wall_s for o in runs) / count:.3f}s",
        )
    console.print(table)


def _load_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise click.BadParameter(f"{spec!r} is not module:attribute", param_hint="--actor")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"cannot load {spec!r}: {exc}", param_hint="--actor") from None
    if not callable(found):
        raise click.BadParameter(f"{spec!r} is not callable", param_hint="--actor")
    return cast("Callable[..., Any]", found)


@cli.command()
@click.option(
    "--store",
    "store_spec",
    required=True,
    help="The cluster's store: sqlite:PATH, postgresql://..., fdb:[CLUSTER_FILE] or memory.",
)
@click.option(
    "--actor",
    "actor_spec",
    required=True,
    help="The actors' factory, as module:attribute, called with each ActorId.",
)
@click.option(
    "--listen",
    default="127.0.0.1:0",
    show_default=True,
    help="host:port where other nodes and clients reach this node (port 0: a free one).",
)
@click.option("--name", default=None, help="The node's name (default: node-PID).")
@click.option(
    "--lease-ms",
    type=click.IntRange(min=100),
    default=10_000,
    show_default=True,
    help="The node's lease on the store's clock; renewed every fifth of it.",
)
def node(store_spec: str, actor_spec: str, listen: str, name: str | None, lease_ms: int) -> None:
    """Runs one node of an actor cluster until SIGTERM or SIGINT, then drains it.

    Once it serves, it prints one JSON line: {"node", "address", "epoch"}.
    """
    from kelpie.core import ConfigError as _ConfigError

    factory = _load_factory(actor_spec)
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"{listen!r} is not host:port", param_hint="--listen")
    try:
        trio.run(
            _run_node, store_spec, factory, host, int(port), name or f"node-{os.getpid()}", lease_ms
        )
    except _ConfigError as exc:
        raise click.UsageError(str(exc)) from None


async def _run_node(
    store_spec: str,
    factory: Callable[..., Any],
    host: str,
    port: int,
    name: str,
    lease_ms: int,
) -> None:
    from kelpie.env import Env, TcpNetwork
    from kelpie.runtime import RuntimeConfig, open_runtime
    from kelpie.storage import open_store

    config = RuntimeConfig(lease_duration_ms=lease_ms, lease_renew_ms=lease_ms // 5)
    network = TcpNetwork(host, port)
    store = await open_store(store_spec)
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            env = Env.production(node=name, network=network)
            async with open_runtime(store, env, factory, config) as runtime:
                ready = {"node": name, "address": runtime.address, "epoch": runtime.epoch}
                print(json.dumps(ready), flush=True)
                async for _ in signals:
                    break
    finally:
        await network.aclose()
        await store.aclose()


def main() -> None:
    """Console entry point: re-executes with PYTHONHASHSEED=0 when needed, then runs the CLI."""
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    cli()


if __name__ == "__main__":
    main()
