"""Placement: which node takes an actor that has no valid owner.

A placement policy is a function `(nodes, me, rng) -> node`: `nodes` are the
live nodes (this one included, with its current load), `me` is this node, and
the answer is where the actor should be activated. The default,
`least_loaded`, picks the node with the fewest active actors among those that
are not draining and can be reached (have an address), breaking ties at random.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kelpie.env import Rng
from kelpie.runtime._membership import NodeRecord

#: (live nodes, this node, rng) -> the node to place the actor on.
Placement = Callable[[Sequence[NodeRecord], NodeRecord, Rng], NodeRecord]


def least_loaded(nodes: Sequence[NodeRecord], me: NodeRecord, rng: Rng) -> NodeRecord:
    """The live node with the fewest active actors (ties broken at random)."""
    candidates = [
        node for node in nodes if not node.draining and (node.address or node.epoch == me.epoch)
    ]
    if not candidates:
        return me
    least = min(node.load for node in candidates)
    return rng.choice([node for node in candidates if node.load == least])


def local_first(nodes: Sequence[NodeRecord], me: NodeRecord, rng: Rng) -> NodeRecord:
    """Always this node (while it is not draining): no forwarding for new actors."""
    return me if not me.draining else least_loaded(nodes, me, rng)
