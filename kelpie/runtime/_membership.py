"""Cluster membership: each node holds a lease in the store, stamped with the store's clock.

A node joins by taking a new *epoch*, a number the store hands out once and
never again (a counter at ("cluster", "epoch")), and writing its record at
("cluster", "node", epoch): name, address, lease expiry, load, draining. The
expiry is `read_version + lease_duration` of the transaction that wrote it:
the store's clock, never the node's own wall clock, which may be skewed or
jump. A record whose expiry is at or before a transaction's read version is
*lapsed* for that transaction and for every later one: renewal refuses to
extend a lapsed lease, so a node whose lease lapsed must join again with a new
epoch before it acts again, and every activation record naming its old epoch
is void from then on (kelpie/runtime/_directory.py). A node that takes an actor
from a lapsed owner reads that owner's record with a conflicting read and
clears it in the same transaction, so a renewal that read the record just
before it lapsed and commits just after conflicts with the takeover: either the
takeover sees the renewed lease, or the renewal finds its record gone.

The node also keeps a local deadline on trio's monotonic clock: the moment it
started the transaction that last extended its lease, plus `lease_safety` of
the lease's duration. The store's expiry is later than that (its read version
came after the start), provided the store's clock does not run more than
1/`lease_safety` - 1 faster than the node's monotonic clock (an assumption,
stated in docs/ACTORS.md). Past its local deadline, a node stops serving until
a renewal succeeds: it never answers from state another node may by now own.
Safety of commits does not depend on any of this timing (commits re-read the
activation record); the leases only decide when another node may take over.
"""

from __future__ import annotations

import math

import attrs
import trio

from kelpie.env import Env
from kelpie.storage import (
    VERSIONS_PER_SECOND,
    RetryPolicy,
    Store,
    Transaction,
    pack,
    transact,
    tuple_range,
    unpack,
)

_EPOCH_KEY = pack(("cluster", "epoch"))
_NODES_BEGIN, _NODES_END = tuple_range(("cluster", "node"))
#: The share of the lease a node trusts its local deadline with.
LEASE_SAFETY = 0.8
#: How long a lapsed record stays before a renewing node clears it (in lease durations).
_LAPSED_KEEP_LEASES = 10


def node_key(epoch: int) -> bytes:
    """Where the record of the node incarnation `epoch` lives."""
    return pack(("cluster", "node", epoch))


@attrs.frozen
class NodeRecord:
    """One node incarnation as the store knows it."""

    epoch: int
    name: str
    #: Where other nodes send it requests ("" when it has no network).
    address: str
    #: The store version (microseconds on the store's clock) at which its lease lapses.
    expires_version: int
    #: Active actors when it last renewed (placement picks the least loaded).
    load: int
    #: Leaving the cluster: takes no new actors.
    draining: bool

    def encode(self) -> bytes:
        return pack((self.name, self.address, self.expires_version, self.load, self.draining))

    @classmethod
    def decode(cls, epoch: int, value: bytes) -> NodeRecord:
        name, address, expires, load, draining = unpack(value)
        return cls(epoch, name, address, expires, load, bool(draining))

    def live_at(self, version: int) -> bool:
        """Whether its lease still holds for a transaction reading at `version`."""
        return version < self.expires_version


async def read_node(tr: Transaction, epoch: int, *, snapshot: bool = True) -> NodeRecord | None:
    """The record of incarnation `epoch` (a snapshot read unless `snapshot=False`)."""
    value = await tr.get(node_key(epoch), snapshot=snapshot)
    return None if value is None else NodeRecord.decode(epoch, value)


class Membership:
    """This node's lease (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        env: Env,
        *,
        address: str,
        lease_duration_ms: int,
        retry: RetryPolicy,
    ) -> None:
        self._store = store
        self._env = env
        self.name = env.node
        self.address = address
        self._lease_versions = lease_duration_ms * VERSIONS_PER_SECOND // 1000
        self._lease_s = lease_duration_ms / 1000
        self._retry = retry
        #: This incarnation's epoch (0: not joined).
        self.epoch = 0
        self._deadline_s = -math.inf
        self.lease_changed = trio.Event()

    def holds_lease(self) -> bool:
        """Whether the node may act now: joined, and its local lease deadline not passed."""
        return self.epoch != 0 and trio.current_time() < self._deadline_s

    @property
    def deadline_s(self) -> float:
        """The monotonic time until which this node trusts its lease."""
        return self._deadline_s

    def _extended(self, started_s: float) -> None:
        self._deadline_s = started_s + self._lease_s * LEASE_SAFETY
        self.lease_changed.set()
        self.lease_changed = trio.Event()

    async def join(self, load: int = 0) -> int:
        """Takes a new epoch and a fresh lease; returns the epoch."""
        started_s = trio.current_time()

        async def register(tr: Transaction) -> int:
            last = await tr.get(_EPOCH_KEY)
            epoch = (unpack(last)[0] if last is not None else 0) + 1
            tr.set(_EPOCH_KEY, pack((epoch,)))
            record = NodeRecord(
                epoch,
                self.name,
                self.address,
                await tr.read_version() + self._lease_versions,
                load,
                False,
            )
            tr.set(node_key(epoch), record.encode())
            return epoch

        self._deadline_s = -math.inf
        self.epoch = 0
        # A lost commit_unknown_result retry may leave an unused epoch behind: harmless.
        self.epoch = await transact(self._store, register, rng=self._env.rng, policy=self._retry)
        self._extended(started_s)
        self._env.emit("cluster.join", epoch=self.epoch)
        return self.epoch

    async def renew(self, *, load: int, draining: bool) -> bool:
        """Extends the lease; False when it had lapsed (the node must `join` again)."""
        epoch = self.epoch
        started_s = trio.current_time()

        async def extend(tr: Transaction) -> bool:
            value = await tr.get(node_key(epoch))
            version = await tr.read_version()
            if value is None:
                return False
            record = NodeRecord.decode(epoch, value)
            if not record.live_at(version):
                return False
            renewed = attrs.evolve(
                record,
                expires_version=version + self._lease_versions,
                load=load,
                draining=draining,
            )
            tr.set(node_key(epoch), renewed.encode())
            await self._clear_lapsed(tr, version)
            return True

        if not await transact(self._store, extend, rng=self._env.rng, policy=self._retry):
            self._deadline_s = -math.inf
            self._env.emit("cluster.lapsed", epoch=epoch)
            return False
        if epoch == self.epoch:
            self._extended(started_s)
        return True

    async def _clear_lapsed(self, tr: Transaction, version: int) -> None:
        """Clears records that lapsed long ago (their epochs stay void: epochs are never reused)."""
        horizon = version - self._lease_versions * _LAPSED_KEEP_LEASES
        for key, value in await tr.get_range(_NODES_BEGIN, _NODES_END, snapshot=True):
            record = NodeRecord.decode(unpack(key)[2], value)
            if record.expires_version < horizon:
                tr.clear(key)

    async def leave(self) -> None:
        """Ends this incarnation: its record goes, so every actor it owned is free at once."""
        epoch, self.epoch = self.epoch, 0
        self._deadline_s = -math.inf
        if epoch == 0:
            return

        async def remove(tr: Transaction) -> None:
            tr.clear(node_key(epoch))

        await transact(self._store, remove, rng=self._env.rng, policy=self._retry)
        self._env.emit("cluster.leave", epoch=epoch)

    async def live_nodes(self) -> list[NodeRecord]:
        """Every node whose lease holds now, in epoch order (a snapshot: for placement only)."""

        async def scan(tr: Transaction) -> list[NodeRecord]:
            version = await tr.read_version()
            rows = await tr.get_range(_NODES_BEGIN, _NODES_END, snapshot=True)
            records = [NodeRecord.decode(unpack(key)[2], value) for key, value in rows]
            return [record for record in records if record.live_at(version)]

        return await transact(self._store, scan, rng=self._env.rng, policy=self._retry)
