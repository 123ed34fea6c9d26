"""The serializability checker: a serialization-graph cycle check over committed transactions."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Literal

import attrs


@attrs.frozen
class CommittedTransaction:
    """One committed transaction of a history, for `serialization_cycle`.

    `writes` are the keys it installed a new version of (a set, or a clear of a
    key that had a value). `reads` maps each key it read from the store (not
    from its own writes, not with snapshot=True; a range read counts as a read
    of every key of the universe in the part it scanned) to the version it saw:
    n means the value written by the n-th writer of that key in the history, 0
    the key's initial state.
    """

    name: str
    reads: Mapping[bytes, int] = attrs.field(factory=dict)
    writes: frozenset[bytes] = frozenset()


@attrs.frozen
class Dependency:
    """An edge of the serialization graph: `source` must come before `target` (Adya's DSG).

    kind "ww": target wrote the next version of `key` after source's;
    "wr": target read the version source wrote; "rw": source read a version
    of `key` and target wrote the next one (an anti-dependency).
    """

    source: str
    target: str
    kind: Literal["ww", "wr", "rw"]
    key: bytes


def serialization_cycle(history: Sequence[CommittedTransaction]) -> list[Dependency] | None:
    """A cycle of the history's serialization graph, or None if it has none.

    `history` lists the committed transactions in commit order, which is also
    each key's version order (every backend applies writes at commit). The graph
    has Adya's ww, wr and rw edges; the history is serializable (in an order
    consistent with those version orders) exactly when the graph is acyclic, and
    then any topological order is a serial order. The cycle is returned as its
    edges in order, the last one leading back to the first one's source.
    """
    names = [t.name for t in history]
    if len(set(names)) != len(names):
        raise ValueError("transaction names must be unique")
    writers: dict[bytes, list[str]] = {}
    for t in history:
        for key in sorted(t.writes):
            writers.setdefault(key, []).append(t.name)
    edges: dict[str, list[Dependency]] = {name: [] for name in names}

    def add(source: str, target: str, kind: Literal["ww", "wr", "rw"], key: bytes) -> None:
        if source != target:
            edges[source].append(Dependency(source, target, kind, key))

    for key, keyed in sorted(writers.items()):
        for earlier, later in itertools.pairwise(keyed):
            add(earlier, later, "ww", key)
    for t in history:
        for key, version in sorted(t.reads.items()):
            keyed = writers.get(key, [])
            if not 0 <= version <= len(keyed):
                raise ValueError(f"{t.name} read version {version} of {key!r}, which has none")
            if version > 0:
                add(keyed[version - 1], t.name, "wr", key)
            if version < len(keyed):
                add(t.name, keyed[version], "rw", key)
    return _find_cycle(names, edges)


def _find_cycle(nodes: list[str], edges: Mapping[str, list[Dependency]]) -> list[Dependency] | None:
    """A cycle of the graph (by iterative depth-first search), or None."""
    done: set[str] = set()
    for root in nodes:
        if root in done:
            continue
        path: list[Dependency] = []  # the edges from root to the node on top of the stack
        on_path = {root: 0}
        stack = [(root, iter(edges[root]))]
        while stack:
            node, out = stack[-1]
            edge = next(out, None)
            if edge is None:
                stack.pop()
                del on_path[node]
                done.add(node)
                if path:
                    path.pop()
                continue
            if edge.target in on_path:
                return [*path[on_path[edge.target] :], edge]
            if edge.target not in done:
                path.append(edge)
                on_path[edge.target] = len(path)
                stack.append((edge.target, iter(edges[edge.target])))
    return None


def describe_cycle(cycle: Sequence[Dependency]) -> str:
    """A cycle on one line: `t1 -rw b'x'-> t2 -ww b'y'-> t1`."""
    if not cycle:
        return "(no cycle)"
    steps = [cycle[0].source]
    for edge in cycle:
        steps.append(f"-{edge.kind} {edge.key!r}-> {edge.target}")
    return " ".join(steps)


# -- the state machine ---------------------------------------------------------------------
