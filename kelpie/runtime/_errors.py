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
