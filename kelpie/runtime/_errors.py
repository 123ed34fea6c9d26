"""The actor runtime's typed errors."""

from __future__ import annotations

from kelpie.core import KelpieError


class ActorError(KelpieError):
    """Base class of the actor runtime's errors."""


class MailboxFull(ActorError):
    """The actor's mailbox holds `mailbox_size` messages already: back off and retry later.

    Nothing was delivered.
    """


class InvocationTimeout(ActorError):
    """The actor did not finish handling the message in time.

    Usually nothing it did was committed; but if the time ran out during the
    commit, the commit may have applied, as with `CommitUnknownResult`: only an
    idempotent message may be retried blindly. (The runtime reloads the actor's
    state from the store either way.)
    """


class RuntimeClosed(ActorError):
    """The runtime is shutting down or shut down and takes no new messages."""


class ContextUnavailable(ActorError):
    """The actor used its working memory outside `activate`, `handle` or `deactivate`."""


class OwnershipLost(ActorError):
    """This activation no longer owns its actor (its node's lease lapsed and the actor moved).

    Nothing of the invocation was committed; the runtime routes a retry to the
    actor's new owner.
    """


class ActorUnavailable(ActorError):
    """The actor could not be reached now (its owner is unreachable, or this node holds no
    lease); nothing was delivered. Retry later.
    """


class ActorFailed(ActorError):
    """The actor raised an exception of its own while handling the message (nothing committed).

    `error_type` names the exception's class; on the node that ran the actor the
    original exception is also the `__cause__`.
    """

    def __init__(self, message: str, *, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class InvalidMessage(ActorError):
    """A message or reply is not a JSON value (None, bool, int, float, str, list, dict with
    str keys), so it cannot cross between nodes. Nothing was delivered.
    """


class AlreadyApplied(ActorError):
    """A call with this idempotency key was applied before, but its reply was too large to keep."""


class InvocationInterrupted(ActorError):
    """The node stopped (was cancelled) while the actor handled the message; it may have
    been applied, as with `CommitUnknownResult`.
    """
