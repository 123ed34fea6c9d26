"""`RetryingLLM`: model calls retried with jittered backoff, in the Env's time and randomness.

The providers (kelpie/agent/_openai.py, _anthropic.py) make exactly one HTTP
request per call: the SDKs' own retries are off, because their jitter reads the
global `random` and their waits the real clock. Retrying happens here, with the
Env's randomness and trio's clock, so a simulated run retries deterministically
and in virtual time.

- Each attempt has a deadline (`attempt_timeout_ms`, through `trio.move_on_after`);
  an attempt that misses it is an `LLMUnavailable`.
- Only errors whose `retryable` is true are retried (429, 5xx, timeouts, broken
  connections, unintelligible replies), at most `attempts_max` attempts in all.
- Before attempt n+1 the wait is drawn uniformly from
  [0, min(backoff_max_ms, backoff_initial_ms * 2**(n-1))] ("full jitter"), and is
  at least the server's Retry-After (capped at `retry_after_max_ms`, so a server
  cannot park an agent for an hour).
- Streaming: a call that has already passed text to `on_text` is never retried.
  The consumer has shown that text to someone; a retry would produce a different
  answer after it, and nothing can take the shown text back. The error is raised
  (with a note saying why it was not retried), and the caller decides.

Each retry is reported as an `llm.retry` event (kelpie/env/_events.py).

Below `RetryingLLM`: how an HTTP failure becomes an `LLMError` (429 rate-limited,
408 and 5xx unavailable, any other status rejected) and how long a Retry-After
asks to wait, shared by the providers and the embedding client.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import attrs
import trio

from kelpie.agent._llm import (
    LLMClient,
    LLMError,
    LLMRateLimited,
    LLMRejected,
    LLMRequest,
    LLMResponse,
    LLMUnavailable,
    TextSink,
)
from kelpie.env import Env, Rng

#: HTTP statuses worth retrying besides 429 and 5xx: 408 Request Timeout.
_RETRYABLE_4XX = frozenset({408})


@attrs.frozen
class LLMRetryPolicy:
    """How `RetryingLLM` retries (see the module docstring for the rules)."""

    attempts_max: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    backoff_initial_ms: int = attrs.field(default=500, validator=attrs.validators.ge(0))
    backoff_max_ms: int = attrs.field(default=30_000, validator=attrs.validators.ge(0))
    #: The longest Retry-After honoured; a longer one is waited for only this long.
    retry_after_max_ms: int = attrs.field(default=60_000, validator=attrs.validators.ge(0))
    #: The deadline of one attempt, streaming included (a whole streamed reply must fit).
    attempt_timeout_ms: int = attrs.field(default=120_000, validator=attrs.validators.ge(1))

    def backoff_ms(self, attempt: int, rng: Rng, retry_after_ms: int | None = None) -> float:
        """How long to wait after failed attempt number `attempt` (1-based).

        One draw from `rng` every time, whether or not a Retry-After wins, so the
        stream's later draws do not depend on what the server said.
        """
        ceiling = min(self.backoff_max_ms, self.backoff_initial_ms * 2 ** (attempt - 1))
        wait_ms = rng.uniform(0, ceiling)
        if retry_after_ms is not None:
            wait_ms = max(wait_ms, float(min(retry_after_ms, self.retry_after_max_ms)))
        return wait_ms


class RetryingLLM(LLMClient):
    """An `LLMClient` that retries another one's retryable failures (module docstring)."""

    def __init__(self, inner: LLMClient, env: Env, policy: LLMRetryPolicy | None = None) -> None:
        self.endpoint_type = inner.endpoint_type
        self.inner = inner
        self.policy = policy or LLMRetryPolicy()
        self._env = env

    async def complete(
        self, request: LLMRequest, *, stream: bool = False, on_text: TextSink | None = None
    ) -> LLMResponse:
        emitted = False
        sink: TextSink | None = None
        if on_text is not None:
            consumer = on_text

            async def tracking_sink(text: str) -> None:
                nonlocal emitted
                emitted = True  # before the await: text handed over counts even if it fails
                await consumer(text)

            sink = tracking_sink

        attempt = 1
        while True:
            try:
                return await self._attempt(request, stream, sink)
            except LLMError as exc:
                if not exc.retryable:
                    raise
                if emitted:
                    exc.add_note("not retried: part of the reply was already streamed to on_text")
                    raise
                if attempt >= self.policy.attempts_max:
                    exc.add_note(f"gave up after {attempt} attempts")
                    raise
                retry_after_ms = exc.retry_after_ms if isinstance(exc, LLMRateLimited) else None
                wait_ms = self.policy.backoff_ms(attempt, self._env.rng, retry_after_ms)
                self._env.emit(
                    "llm.retry",
                    endpoint=self.endpoint_type,
                    model=request.model,
                    attempt=attempt,
                    error=type(exc).__name__,
                    wait_ms=round(wait_ms),
                )
            await trio.sleep(wait_ms / 1000)
            attempt += 1

    async def _attempt(
        self, request: LLMRequest, stream: bool, on_text: TextSink | None
    ) -> LLMResponse:
        timeout_ms = self.policy.attempt_timeout_ms
        with trio.move_on_after(timeout_ms / 1000):
            return await self.inner.complete(request, stream=stream, on_text=on_text)
        raise LLMUnavailable(
            f"{self.endpoint_type} model {request.model!r} did not answer within {timeout_ms} ms"
        )

    async def aclose(self) -> None:
        """Closes the wrapped client when it has anything to close."""
        closer = getattr(self.inner, "aclose", None)
        if closer is not None:
            await closer()


# -- which HTTP failures to retry, and when ---------------------------------------------


def retry_after_ms(headers: Mapping[str, str]) -> int | None:
    """The wait a 429 or 503 asks for, in milliseconds, or None when it names none.

    Reads `retry-after-ms` (OpenAI's and Anthropic's, in milliseconds) first, then
    `retry-after` in seconds, fractions allowed. The HTTP-date form of
    `retry-after` is ignored: reading it would need the wall clock, and the
    backoff covers that case. Negative and non-finite values are ignored.
    `headers` must look names up case-insensitively (httpx2.Headers does).
    """
    for name, scale in (("retry-after-ms", 1.0), ("retry-after", 1000.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            number = float(value.strip())
        except ValueError:
            continue
        if math.isfinite(number) and number >= 0:
            return math.ceil(number * scale)
    return None


def error_for_status(
    status: int, message: str, *, headers: Mapping[str, str] | None = None
) -> LLMError:
    """The `LLMError` for an HTTP error status: 429 rate-limited, 408 and 5xx
    unavailable (both retryable), any other status rejected."""
    if status == 429:
        wait_ms = retry_after_ms(headers) if headers is not None else None
        return LLMRateLimited(message, retry_after_ms=wait_ms)
    if status >= 500 or status in _RETRYABLE_4XX:
        return LLMUnavailable(message)
    return LLMRejected(message, status_code=status)


def shorten(text: str, limit: int = 500) -> str:
    """`text` cut to `limit` characters, for error messages that quote a server."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
