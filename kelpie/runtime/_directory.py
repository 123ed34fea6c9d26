"""The actor directory: which node incarnation owns each actor, and the fence on every commit.

Each actor that has been active has an *activation record* at
`actor_id.key("owner")`: the epoch and name of the node incarnation that owns it
(kelpie/runtime/_membership.py). An owner is *valid* while its node's record
exists and its lease holds at the reading transaction's version; otherwise the
actor is free, and any node may take it by writing its own epoch there.

- Taking an actor (`acquire`) reads the activation record with a conflicting
  read and writes the new owner in the same transaction that loads the actor's
  state, so two nodes racing for one actor conflict, and one loses. Every
  activation writes the record, even its own: that settles any commit of an
  earlier activation whose outcome was unknown (it conflicts, or is seen).
- Every commit of an activation re-reads the record (`fence`) and refuses to
  commit unless it still names the activation's epoch. A commit that raced
  with a takeover conflicts on that key; a later one reads the new owner. So a
  stale activation (a paused process, a node partitioned from the others whose
  lease lapsed) never commits, whatever the clocks say.
- The record stays when an actor is deactivated: the node that owns it keeps it
  (and activates it again on the next message) until that node's lease lapses or
  it leaves the cluster, which frees all its actors at once.
"""

from __future__ import annotations

import attrs

from kelpie.runtime._errors import OwnershipLost
from kelpie.runtime._ids import ActorId
from kelpie.runtime._membership import NodeRecord, node_key, read_node
from kelpie.storage import Transaction, pack, unpack


@attrs.frozen
class Owner:
    """An activation record: the owning node incarnation."""

    epoch: int
    name: str

    def encode(self) -> bytes:
        return pack((self.epoch, self.name))

    @classmethod
    def decode(cls, value: bytes) -> Owner:
        epoch, name = unpack(value)
        return cls(epoch, name)


def owner_key(actor_id: ActorId) -> bytes:
    return actor_id.key("owner")


@attrs.frozen
class Located:
    """Where an actor lives now, as one transaction saw it."""

    #: The valid owner's node record, or None: the actor is free.
    node: NodeRecord | None


async def locate(tr: Transaction, actor_id: ActorId) -> Located:
    """The actor's valid owner, if it has one (a snapshot read: for routing only)."""
    value = await tr.get(owner_key(actor_id), snapshot=True)
    if value is None:
        return Located(None)
    owner = Owner.decode(value)
    record = await read_node(tr, owner.epoch)
    if record is None or not record.live_at(await tr.read_version()):
        return Located(None)
    return Located(record)


async def acquire(tr: Transaction, actor_id: ActorId, me: Owner) -> NodeRecord | None:
    """Makes `me` the owner unless another valid owner holds the actor; returns that owner.

    None means `me` owns the actor when this transaction commits. The record is
    written even when it already names `me`: a commit of an earlier activation
    whose outcome was unknown, should it still land, then conflicts with this
    transaction instead of landing after it unseen. Taking the actor from a
    lapsed owner clears that owner's node record (see kelpie/runtime/_membership.py).
    """
    key = owner_key(actor_id)
    value = await tr.get(key)
    if value is not None:
        owner = Owner.decode(value)
        if owner != me:
            record = await read_node(tr, owner.epoch, snapshot=False)
            if record is not None:
                if record.live_at(await tr.read_version()):
                    return record
                tr.clear(node_key(owner.epoch))
    tr.set(key, me.encode())
    return None


async def fence(tr: Transaction, actor_id: ActorId, me: Owner) -> None:
    """Raises `OwnershipLost` unless `me` still owns the actor (a conflicting read)."""
    value = await tr.get(owner_key(actor_id))
    if value is None or Owner.decode(value) != me:
        holder = "nobody" if value is None else f"epoch {Owner.decode(value).epoch}"
        raise OwnershipLost(
            f"{actor_id} is no longer owned by this activation (epoch {me.epoch}; now "
            f"{holder}): its node's lease lapsed and the actor moved; nothing was committed"
        )
