"""The agent layer's typed errors (each says what to change)."""

from __future__ import annotations

from kelpie.core import KelpieError


class AgentError(KelpieError):
    """A request to an agent was refused."""


class InvalidAgentRequest(AgentError):
    """A field of a request is missing or has the wrong type or value."""


class AgentNotFound(AgentError):
    """No agent has that id."""


class AgentExists(AgentError):
    """An agent with that id was created already."""


class MessageNotFound(AgentError):
    """No message with that id in the agent's history."""


class PassageNotFound(AgentError):
    """No archival passage with that id."""


class ApprovalPending(AgentError):
    """The agent waits for the client's answer to an approval request; send that first."""


class NoApprovalPending(AgentError):
    """An approval answer arrived, but the agent asked for none (or for other tool calls)."""
