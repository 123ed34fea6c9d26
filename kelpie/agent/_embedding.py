"""Embedders: text in, unit-length vectors out, always tagged with the model that made them.

An `Embedder` turns texts into vectors for archival memory's semantic search.
Three implementations:

- `MiniLMEmbedder` (kelpie/agent/_minilm.py), the offline default: the
  all-MiniLM-L6-v2 sentence model run in numpy from hash-pinned files; no
  network, no torch.
- `OpenAIEmbedder` (here): any OpenAI-compatible `/embeddings` API through the
  official `openai` SDK, whose HTTP client is built on `env.http`.
- `FakeEmbedder` (here): a deterministic hash of the words, for the simulator
  and for tests; texts that share words get nearby vectors, nothing more.

The contract every implementation keeps:
- `embed_documents(texts)` returns a float32 array of shape
  `(len(texts), dimension)`, row i for texts[i]; `embed_query(text)` returns
  one vector of shape `(dimension,)`. Every row has unit L2 norm, so a dot
  product is the cosine similarity.
- `model_id` names the model *and* everything that changes its vectors (a
  shortened dimension is part of it). It is stored with every vector, and
  vectors of different model ids are never compared: archival memory leaves
  another model's passages out of search until they are embedded again.

Errors are `EmbeddingError`s; `retryable` says whether trying again later may
succeed. The OpenAI client retries those itself (bounded), so a caller that
gets one has already waited.
"""

from __future__ import annotations

import abc
import hashlib
import re
from collections.abc import Sequence

import attrs
import httpx2
import numpy as np
import numpy.typing as npt
import openai
import trio

# The SDK client on env.http, cut off from OPENAI_* variables and from the SDK's
# platform probe on a worker thread: one recipe for chat and embeddings.
from kelpie.agent._openai import _build_sdk_client
from kelpie.agent._retry import retry_after_ms
from kelpie.core import ConfigError, KelpieError
from kelpie.env import Env, Rng

#: A 1-D float32 vector, or a 2-D array with one vector per row.
Vectors = npt.NDArray[np.float32]


class EmbeddingError(KelpieError):
    """Texts could not be embedded. `retryable` says whether trying again may succeed."""

    retryable: bool = False


class EmbeddingModelMissing(EmbeddingError):
    """The model's files are not installed; the message says how to install them."""


class EmbeddingModelCorrupt(EmbeddingError):
    """The model's files are not the pinned ones (a hash or size differs)."""


class EmbeddingRateLimited(EmbeddingError):
    """The embedding API said 429 Too Many Requests, still after every retry allowed."""

    retryable = True

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        #: The server's last Retry-After, in milliseconds (None: it gave none).
        self.retry_after_ms = retry_after_ms


class EmbeddingUnavailable(EmbeddingError):
    """A 5xx, a timeout, or a failed connection, still after every retry allowed."""

    retryable = True


class EmbeddingRejected(EmbeddingError):
    """The API refused the request (a 4xx other than 429): sending it again cannot help."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class EmbeddingBadResponse(EmbeddingError):
    """The API's answer is not usable: wrong count, wrong dimension, or not numbers."""


class Embedder(abc.ABC):
    """Turns texts into unit-length float32 vectors of one model (see the module docstring)."""

    #: The model and every setting that changes its vectors; stored with each vector.
    model_id: str
    #: The length of every vector.
    dimension: int

    @abc.abstractmethod
    async def embed_documents(self, texts: Sequence[str]) -> Vectors:
        """Vectors for `texts` (passages to store): shape `(len(texts), dimension)`."""

    async def embed_query(self, text: str) -> Vectors:
        """The vector for a search query: shape `(dimension,)`.

        The same as a document by default; a model that embeds queries
        differently (an instruction prefix) overrides this.
        """
        vectors = await self.embed_documents([text])
        vector: Vectors = vectors[0]
        return vector

    async def aclose(self) -> None:
        """Releases what the embedder holds (an HTTP client); it is not used afterwards."""
        await trio.lowlevel.checkpoint()


def normalise_rows(vectors: Vectors) -> Vectors:
    """`vectors` (2-D) with every row scaled to unit L2 norm; a zero row is an error."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if vectors.shape[0] and not np.all(norms > 0):
        raise EmbeddingBadResponse("a zero vector cannot be normalised")
    unit: Vectors = (vectors / norms).astype(np.float32, copy=False)
    return unit


# -- the fake, for simulation ----------------------------------------------------------------

_WORD = re.compile(r"\w+")


class FakeEmbedder(Embedder):
    """A deterministic bag-of-words hash: texts that share words are near, nothing else is.

    Each lowercased word adds +1 or -1 (chosen by its BLAKE2b hash) to one
    coordinate (also chosen by the hash); the sum is normalised. A text without
    words hashes as one word, itself. The vectors depend on the text alone (no
    seed, no process state), so a simulated run embeds identically every time.
    It knows no meaning: "car" and "automobile" are unrelated to it.
    """

    #: The name of this hashing scheme; a dimension other than 64 is appended.
    BASE_MODEL_ID = "kelpie-fake-hash-v1"
    DEFAULT_DIMENSION = 64

    def __init__(self, dimension: int = DEFAULT_DIMENSION) -> None:
        if not 1 <= dimension <= 65_536:
            raise ConfigError(f"FakeEmbedder dimension must be in 1..65536, got {dimension}")
        self.dimension = dimension
        self.model_id = (
            self.BASE_MODEL_ID
            if dimension == self.DEFAULT_DIMENSION
            else f"{self.BASE_MODEL_ID}@{dimension}"
        )

    def vector(self, text: str) -> Vectors:
        """The vector of `text`, computed synchronously."""
        out = np.zeros(self.dimension, dtype=np.float32)
        for word in _WORD.findall(text.lower()) or [text]:
            digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
            value = int.from_bytes(digest, "big")
            out[(value >> 1) % self.dimension] += 1.0 if value & 1 else -1.0
        norm = float(np.linalg.norm(out))
        if norm == 0.0:  # the words cancelled out exactly: fall back to a fixed axis
            out[0] = 1.0
            norm = 1.0
        return out / np.float32(norm)

    async def embed_documents(self, texts: Sequence[str]) -> Vectors:
        await trio.lowlevel.checkpoint()
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row] = self.vector(text)
        return out


# -- any OpenAI-compatible API -----------------------------------------------------------------


@attrs.frozen
class OpenAIEmbedderConfig:
    """Where and how to embed through an OpenAI-compatible `/embeddings` API.

    The retry settings mean what they mean for the LLM (kelpie/agent/_retry.py).
    """

    #: The model name the API knows, e.g. "text-embedding-3-small".
    model: str
    #: The length of every vector the API returns; each reply is checked against it.
    dimension: int
    #: The API's base URL (the SDK appends "/embeddings").
    base_url: str = "https://api.openai.com/v1"
    #: Send `dimensions=dimension`, so that a model that can shorten its vectors
    #: (text-embedding-3-*) does; most other servers reject the parameter.
    send_dimensions: bool = False
    #: Texts per request (OpenAI takes up to 2,048 texts and 300,000 tokens per request).
    batch_size: int = 96
    #: Attempts per request, the first included.
    attempts_max: int = 5
    #: The wait before attempt n+1 is drawn from [0, min(backoff_max_ms,
    #: backoff_initial_ms * 2**(n-1))], and is at least a 429's Retry-After.
    backoff_initial_ms: int = 500
    backoff_max_ms: int = 30_000
    #: The longest Retry-After honoured; a longer one is waited for only this long.
    retry_after_max_ms: int = 60_000
    #: The deadline of one attempt.
    attempt_timeout_ms: int = 60_000

    def __attrs_post_init__(self) -> None:
        limits = {
            "dimension": (self.dimension, 1, 65_536),
            "batch_size": (self.batch_size, 1, 2048),
            "attempts_max": (self.attempts_max, 1, 20),
            "backoff_initial_ms": (self.backoff_initial_ms, 0, 600_000),
            "backoff_max_ms": (self.backoff_max_ms, 0, 600_000),
            "retry_after_max_ms": (self.retry_after_max_ms, 0, 3_600_000),
            "attempt_timeout_ms": (self.attempt_timeout_ms, 1, 3_600_000),
        }
        for name, (value, low, high) in limits.items():
            if not low <= value <= high:
                raise ConfigError(f"OpenAIEmbedderConfig.{name} must be in {low}..{high}: {value}")
        if not self.model:
            raise ConfigError("OpenAIEmbedderConfig.model must name a model")

    @property
    def model_id(self) -> str:
        """The model, with the dimension appended when the API is asked to shorten vectors."""
        return f"{self.model}@{self.dimension}" if self.send_dimensions else self.model

    def backoff_ms(self, attempt: int, rng: Rng, retry_after_ms: int | None) -> float:
        """The wait after failed attempt number `attempt` (1-based): one draw from `rng`."""
        ceiling = min(self.backoff_max_ms, self.backoff_initial_ms * 2 ** (attempt - 1))
        wait_ms = rng.uniform(0, ceiling)
        if retry_after_ms is not None:
            wait_ms = max(wait_ms, float(min(retry_after_ms, self.retry_after_max_ms)))
        return wait_ms


class OpenAIEmbedder(Embedder):
    """Embeddings from an OpenAI-compatible API, in batches, with bounded retries.

    Texts go `batch_size` to a request, through the official `openai` SDK (its
    own retries off: their jitter reads the global `random`) on `env.http`. A
    429, a 5xx, a 408, a missed deadline or a failed connection is retried, up
    to `attempts_max` attempts per request, after a wait drawn from the Env's
    random stream and slept on trio's clock (so a simulated run retries the
    same way every time, in virtual time); each retry is an `embedding.retry`
    event. Any other 4xx fails at once (`EmbeddingRejected`). Every reply must
    hold one vector per text, each of `dimension` finite numbers
    (`EmbeddingBadResponse` otherwise); the vectors are normalised to unit
    length.
    """

    def __init__(self, env: Env, config: OpenAIEmbedderConfig, *, api_key: str = "") -> None:
        """`api_key` may be empty for a local server that wants none."""
        self.config = config
        self.model_id = config.model_id
        self.dimension = config.dimension
        self._env = env
        self._rng = env.rng.fork(f"embedding.openai:{config.model_id}")
        timeout_s = config.attempt_timeout_ms / 1000
        self._sdk = _build_sdk_client(env, config.base_url, api_key, timeout_s)
        #: Requests sent, retries included.
        self.requests_sent = 0

    async def aclose(self) -> None:
        """Closes the SDK's HTTP client (the Env's transport stays open)."""
        await self._sdk.close()

    async def embed_documents(self, texts: Sequence[str]) -> Vectors:
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        step = self.config.batch_size
        for start in range(0, len(texts), step):
            batch = list(texts[start : start + step])
            out[start : start + len(batch)] = await self._embed_batch(batch)
        if not texts:
            await trio.lowlevel.checkpoint()
        return out

    async def _embed_batch(self, texts: list[str]) -> Vectors:
        attempt = 1
        while True:
            try:
                return await self._attempt(texts)
            except EmbeddingError as exc:
                if not exc.retryable:
                    raise
                if attempt >= self.config.attempts_max:
                    exc.add_note(f"gave up after {attempt} attempts")
                    raise
                retry_after_ms = (
                    exc.retry_after_ms if isinstance(exc, EmbeddingRateLimited) else None
                )
                wait_ms = self.config.backoff_ms(attempt, self._rng, retry_after_ms)
                self._env.emit(
                    "embedding.retry",
                    model=self.model_id,
                    attempt=attempt,
                    error=type(exc).__name__,
                    wait_ms=round(wait_ms),
                )
            await trio.sleep(wait_ms / 1000)
            attempt += 1

    async def _attempt(self, texts: list[str]) -> Vectors:
        self.requests_sent += 1
        where = f"embedding API at {self.config.base_url}"
        timeout_ms = self.config.attempt_timeout_ms
        with trio.move_on_after(timeout_ms / 1000):
            try:
                response = await self._sdk.embeddings.create(
                    model=self.config.model,
                    input=texts,
                    encoding_format="float",
                    dimensions=self.dimension if self.config.send_dimensions else openai.omit,
                )
            except openai.APIStatusError as exc:
                raise _status_error(exc, where) from exc
            except openai.APIResponseValidationError as exc:
                raise EmbeddingBadResponse(f"{where}: reply not understood: {exc.message}") from exc
            except openai.APIConnectionError as exc:  # APITimeoutError included
                raise EmbeddingUnavailable(f"{where}: {exc.message} ({exc.__cause__!r})") from exc
            except (openai.OpenAIError, httpx2.DecodingError, ValueError) as exc:
                raise EmbeddingBadResponse(f"{where}: reply not understood: {exc}") from exc
            # The SDK does not validate replies: a body of another shape arrives as it is.
            return self._vectors(getattr(response, "data", None), len(texts))
        raise EmbeddingUnavailable(f"{where} did not answer within {timeout_ms} ms")

    def _vectors(self, data: object, count: int) -> Vectors:
        """The reply's vectors in the order of the texts, checked and normalised."""
        if not isinstance(data, list) or len(data) != count:
            got = len(data) if isinstance(data, list) else "no list of"
            raise EmbeddingBadResponse(f"asked for {count} embeddings, got {got}")
        out = np.zeros((count, self.dimension), dtype=np.float32)
        seen: set[int] = set()
        for position, item in enumerate(data):
            index = getattr(item, "index", position)
            if not isinstance(index, int) or not 0 <= index < count or index in seen:
                raise EmbeddingBadResponse(f"embedding index {index!r} is missing or repeated")
            seen.add(index)
            try:
                vector = np.asarray(getattr(item, "embedding", None), dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise EmbeddingBadResponse(f"embedding {index} is not a list of numbers") from exc
            if vector.shape != (self.dimension,):
                raise EmbeddingBadResponse(
                    f"model {self.config.model!r} returned a vector of shape {vector.shape}, "
                    f"not ({self.dimension},): set OpenAIEmbedderConfig.dimension to the "
                    "model's dimension (or send_dimensions=True if it can shorten vectors)"
                )
            if not np.all(np.isfinite(vector)):
                raise EmbeddingBadResponse(f"embedding {index} holds a NaN or an infinity")
            out[index] = vector
        return normalise_rows(out)


def _status_error(exc: openai.APIStatusError, where: str) -> EmbeddingError:
    status = exc.status_code
    message = f"{where}: HTTP {status}: {exc.message[:500]}"
    if status == 429:
        wait_ms = retry_after_ms(exc.response.headers)
        return EmbeddingRateLimited(message, retry_after_ms=wait_ms)
    if status >= 500 or status == 408:
        return EmbeddingUnavailable(message)
    return EmbeddingRejected(message, status_code=status)
