"""How the actor benchmarks print figures: a rich table to read, and `figure` lines to grep.

Every row of the table is also printed as one line

    figure <id> <name>=<value> [<name>=<value> ...]

with plain numbers (no thousands separators), so that `grep '^figure '` picks
out every figure of a run and a script can parse them.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

#: Logs and CI are not terminals: give tables room instead of rich's 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)

Number = int | float


def plain(value: Number | str) -> str:
    """`value` for a figure line: ints as they are, floats to 3 decimals (trailing zeros cut)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text or "0"


class Report:
    """One table of figures; `print()` shows it, then its figure lines."""

    def __init__(self, title: str, columns: Sequence[str]) -> None:
        self._title = title
        self._table = Table(*columns, show_edge=False)
        for column in self._table.columns[1:]:
            column.justify = "right"
        self._lines: list[str] = []

    def add(self, figure_id: str, cells: Sequence[str], **values: Number | str) -> None:
        """A row of the table (`cells`, as shown) and its figure line (`values`)."""
        self._table.add_row(*cells)
        pairs = " ".join(f"{name}={plain(value)}" for name, value in values.items())
        self._lines.append(f"figure {figure_id} {pairs}")

    def print(self) -> None:
        console.print()
        console.print(self._title, style="bold", markup=False)
        console.print(self._table)
        for line in self._lines:
            print(line, flush=True)


def ms(seconds: float) -> str:
    """A latency for the table, in milliseconds."""
    return f"{seconds * 1000:.2f}"


def per_s(rate: float) -> str:
    """A rate for the table, with thousands separators."""
    return f"{rate:,.0f}"


def mib(size_bytes: int) -> str:
    """A size for the table, in MiB."""
    return f"{size_bytes / 2**20:,.1f}"


def p50_p99(latencies_s: Sequence[float]) -> tuple[float, float]:
    """The median and 99th percentile of `latencies_s` (at least two of them)."""
    cuts = statistics.quantiles(latencies_s, n=100, method="inclusive")
    return cuts[49], cuts[98]
