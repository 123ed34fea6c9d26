"""Virtual actors: activation on demand, one message at a time, state committed atomically,
and single activation across a cluster of nodes sharing one store (docs/ACTORS.md).
"""

from kelpie.runtime._actor import Actor, ActorContext
from kelpie.runtime._client import NodeClient
from kelpie.runtime._errors import (
    ActorError,
    ActorFailed,
    ActorUnavailable,
    AlreadyApplied,
    ContextUnavailable,
    InvalidMessage,
    InvocationInterrupted,
    InvocationTimeout,
    MailboxFull,
    OwnershipLost,
    RuntimeClosed,
)
from kelpie.runtime._ids import ACTOR_ID_PART_MAX_CHARS, ActorId, InvalidActorId
from kelpie.runtime._membership import NodeRecord
from kelpie.runtime._placement import Placement, least_loaded, local_first
from kelpie.runtime._runtime import ActorRuntime, RuntimeConfig, open_runtime
from kelpie.runtime._wire import IDEMPOTENCY_KEY_MAX_CHARS

__all__ = [
    "ACTOR_ID_PART_MAX_CHARS",
    "IDEMPOTENCY_KEY_MAX_CHARS",
    "Actor",
    "ActorContext",
    "ActorError",
    "ActorFailed",
    "ActorId",
    "ActorRuntime",
    "ActorUnavailable",
    "AlreadyApplied",
    "ContextUnavailable",
    "InvalidActorId",
    "InvalidMessage",
    "InvocationInterrupted",
    "InvocationTimeout",
    "MailboxFull",
    "NodeClient",
    "NodeRecord",
    "OwnershipLost",
    "Placement",
    "RuntimeClosed",
    "RuntimeConfig",
    "least_loaded",
    "local_first",
    "open_runtime",
]
