"""How simulation results are shown to people: failures, reproduce commands, summaries.

Every failure prints the seed, the scenario, the fault configuration, the git
commit, the trace tail, what failed, and one command that reproduces it.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kelpie.sim._result import RunResult

_REPO = Path(__file__).resolve().parents[2]


def reproduce_command(scenario: str, seed: int, schedule: str = "random") -> str:
    """The one command that replays this run exactly."""
    command = f"DST_SEED={seed} kelpie sim --scenario {shlex.quote(scenario)}"
    if schedule == "replay":
        return (
            f"replay its recorded schedule with the same seed: "
            f"SimConfig(seed={seed}, schedule=<choices>) ({command} runs the seeded schedule)"
        )
    return command + (" --schedule fifo" if schedule == "fifo" else "")


def git_commit() -> str:
    """The checkout's commit, with `+dirty` when it has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=_REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def trace_table(result: RunResult, title: str = "trace tail") -> Table:
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for column, justify in (
        ("#", "right"),
        ("t (s)", "right"),
        ("node", "left"),
        ("task", "left"),
        ("event", "left"),
        ("detail", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in result.trace_tail:
        table.add_row(
            str(row.seq),
            f"{row.time_s:.6f}",
            row.node,
            escape(row.task),
            row.kind,
            escape(row.detail),
        )
    return table


def print_result(
    console: Console, result: RunResult, *, commit: str, show_trace: bool = False
) -> None:
    """A full report of one run: a one-line pass, or everything about a failure."""
    facts = (
        f"steps {result.steps}, t={result.sim_time_s:.6g}s, trace {result.trace_hash} "
        f"({result.trace_rows} rows), schedule deviations {result.schedule_deviations}"
    )
    if result.failure is None:
        console.print(f"[bold green]PASS[/] {result.scenario} seed {result.seed}: {facts}")
        if show_trace:
            console.print(trace_table(result))
        _print_findings(console, result)
        return
    failure = result.failure
    console.print(
        f"[bold red]FAIL[/] {result.scenario} seed {result.seed}: [bold]{failure.kind.value}[/]"
    )
    console.print(f"  {escape(failure.message)}")
    console.print(f"  seed      {result.seed}")
    console.print(f"  scenario  {result.scenario}")
    console.print(f"  faults    {escape(result.faults)}")
    console.print(f"  commit    {commit}")
    console.print(f"  run       {facts}")
    fired = [f"{s.site} x{s.fired}" for s in result.buggify if s.fired]
    if fired:
        console.print(f"  buggify   {', '.join(fired)}")
    console.print(trace_table(result))
    if failure.details:
        console.print("[bold]details[/]")
        for line in failure.details:
            console.print(f"  {escape(line)}", highlight=False)
    _print_findings(console, result)
    command = reproduce_command(result.scenario, result.seed, result.schedule)
    console.print(f"[bold]reproduce:[/] {escape(command)}")


def _print_findings(console: Console, result: RunResult) -> None:
    if result.findings:
        console.print("[bold]sanitizer[/]")
        for finding in result.findings:
            console.print(f"  {escape(finding.describe())}", highlight=False)
