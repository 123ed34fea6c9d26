"""Delivering a request to an actor until its outcome is known.

`runtime.invoke` may fail in ways that leave it unknown whether the call was
applied (`CommitUnknownResult`, `InvocationTimeout`, `InvocationInterrupted`, a
network `DeliveryUnknown` or `RemoteFailure`). With an idempotency key, sending
the same call again is safe and settles it: the actor applies it at most once
and a repeat gets the stored reply.
"""

from __future__ import annotations

from typing import Any

import trio

from kelpie.env import DeliveryUnknown, Env, RemoteFailure
from kelpie.runtime import ActorId, ActorRuntime, InvocationInterrupted, InvocationTimeout
from kelpie.storage import CommitUnknownResult, RetryPolicy

#: Errors after which a request may or may not have been applied: send it again.
MAYBE_APPLIED = (
    CommitUnknownResult,
    InvocationInterrupted,
    InvocationTimeout,
    DeliveryUnknown,
    RemoteFailure,
)

#: How often, and how patiently, a call whose outcome is unknown is sent again.
RESEND = RetryPolicy(attempts_max=5, backoff_initial_ms=50)


async def invoke_until_known(
    runtime: ActorRuntime,
    env: Env,
    actor: ActorId,
    message: Any,
    key: str | None,
    policy: RetryPolicy = RESEND,
) -> Any:
    """`runtime.invoke`, sent again with the same key while the outcome is unknown.

    Without a key nothing is resent (a repeat could apply twice). After
    `policy.attempts_max` attempts the last error is raised: still unknown.
    """
    attempt = 1
    while True:
        try:
            return await runtime.invoke(actor, message, idempotency_key=key)
        except MAYBE_APPLIED as exc:
            if key is None or attempt >= policy.attempts_max:
                raise
            env.emit("agent.resend", actor=str(actor), error=type(exc).__name__, attempt=attempt)
        await trio.sleep(policy.backoff_ms(attempt, env.rng) / 1000)
        attempt += 1
