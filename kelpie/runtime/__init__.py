"""Virtual actors: activation on demand, one message at a time, state committed atomically.

This layer holds one node's runtime (`open_runtime`); the cluster (membership,
directory, forwarding) follows in the actors issue.
"""

from kelpie.runtime._actor import Actor, ActorContext
from kelpie.runtime._errors import (
    ActorError,
    ContextUnavailable,
    InvocationTimeout,
    MailboxFull,
    RuntimeClosed,
)
from kelpie.runtime._ids import ACTOR_ID_PART_MAX_CHARS, ActorId, InvalidActorId
from kelpie.runtime._runtime import ActorRuntime, RuntimeConfig, open_runtime

__all__ = [
    "ACTOR_ID_PART_MAX_CHARS",
    "Actor",
    "ActorContext",
    "ActorError",
    "ActorId",
    "ActorRuntime",
    "ContextUnavailable",
    "InvalidActorId",
    "InvocationTimeout",
    "MailboxFull",
    "RuntimeClosed",
    "RuntimeConfig",
    "open_runtime",
]
