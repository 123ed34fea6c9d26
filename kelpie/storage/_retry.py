"""`transact`: run a transaction function, commit it, and retry it on retryable errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import trio

from kelpie.env import Rng
from kelpie.storage._api import Store, Transaction
from kelpie.storage._errors import StorageError

T = TypeVar("T")


@attrs.frozen
class RetryPolicy:
    """How `transact` retries: at most `attempts_max` attempts, with jittered exponential backoff.

    Before attempt n+1 it sleeps a duration drawn uniformly from
    [0, min(backoff_max_ms, backoff_initial_ms * 2**(n-1))] ("full jitter"), so
    clients that collided do not collide again in step.
    """

    attempts_max: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    backoff_initial_ms: int = attrs.field(default=10, validator=attrs.validators.ge(0))
    backoff_max_ms: int = attrs.field(default=1_000, validator=attrs.validators.ge(0))

    def backoff_ms(self, attempt: int, rng: Rng) -> float:
        """How long to wait after failed attempt number `attempt` (1-based)."""
        ceiling = min(self.backoff_max_ms, self.backoff_initial_ms * 2 ** (attempt - 1))
        return rng.uniform(0, ceiling)


async def transact(
    store: Store,
    fn: Callable[[Transaction], Awaitable[T]],
    *,
    rng: Rng,
    policy: RetryPolicy = RetryPolicy(),
    on_retry: Callable[[StorageError, int], None] | None = None,
) -> T:
    """Runs `fn(tr)` in a new transaction and commits it, retrying retryable errors.

    `fn` must not commit; it may be run several times, and after
    `CommitUnknownResult` an earlier run may already have committed, so `fn` must
    be idempotent (see "commit_unknown_result" in kelpie.storage._api). Errors
    that are not retryable, and the last error once `policy.attempts_max`
    attempts have failed, are raised (the latter with a note giving the count).
    The backoff is drawn from `rng` and slept with `trio.sleep`, so it takes
    virtual time in simulation. `on_retry(error, attempt)`, if given, is called
    before each retry with the error that failed attempt number `attempt`.
    """
    attempt = 1
    while True:
        async with store.transaction() as tr:
            try:
                result = await fn(tr)
                await tr.commit()
            except StorageError as exc:
                if not exc.retryable:
                    raise
                if attempt >= policy.attempts_max:
                    exc.add_note(f"gave up after {attempt} attempts")
                    raise
                if on_retry is not None:
                    on_retry(exc, attempt)
            else:
                return result
        await trio.sleep(policy.backoff_ms(attempt, rng) / 1000)
        attempt += 1
