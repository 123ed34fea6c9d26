"""Seeded randomness, the only source of it in Kelpie.

An `Rng` is a seeded pseudo-random stream. `fork(label)` derives an independent
child stream from the parent's *seed* and the label with BLAKE2b (never the
builtin `hash()`, which is salted per process), so a child's draws do not depend
on how many draws its parent or siblings made: adding one draw in the storage
layer does not reshuffle the agents' ids. Forking the same label twice gives the
same stream, on purpose; use distinct labels for distinct consumers.

Ids (`agent-<uuid>`, `message-<uuid>`) are drawn from an `Rng` too, so a
simulated run names everything identically every time.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import MutableSequence, Sequence
from typing import TypeVar

T = TypeVar("T")

#: Seeds are stored in 16 bytes when deriving child streams.
_SEED_LIMIT = 1 << 128


def derive_seed(seed: int, label: str) -> int:
    """The 64-bit seed of the child stream `label` of the stream seeded with `seed`."""
    material = seed.to_bytes(16, "big", signed=False) + label.encode("utf-8")
    digest = hashlib.blake2b(material, digest_size=8, person=b"kelpie-rng-fork").digest()
    return int.from_bytes(digest, "big")


class Rng:
    """A seeded random stream with derivable children. Not thread-safe (nothing here is)."""

    __slots__ = ("_random", "_seed")

    def __init__(self, seed: int) -> None:
        if not 0 <= seed < _SEED_LIMIT:
            raise ValueError(f"seed must be a non-negative integer below 2**128, got {seed}")
        self._seed = seed
        self._random = random.Random(seed)

    @property
    def seed(self) -> int:
        """The seed this stream was created with."""
        return self._seed

    def fork(self, label: str) -> Rng:
        """An independent child stream named `label` (see the module docstring)."""
        return Rng(derive_seed(self._seed, label))

    def random(self) -> float:
        """A float in [0, 1)."""
        return self._random.random()

    def chance(self, p: float) -> bool:
        """True with probability `p`."""
        return self._random.random() < p

    def uniform(self, a: float, b: float) -> float:
        """A float in [a, b]."""
        return self._random.uniform(a, b)

    def expovariate(self, rate: float) -> float:
        """An exponentially distributed float with mean 1/rate (Poisson inter-arrival times)."""
        return self._random.expovariate(rate)

    def randrange(self, start: int, stop: int | None = None) -> int:
        """An int in [start, stop), or in [0, start) when `stop` is omitted."""
        if stop is None:
            return self._random.randrange(start)
        return self._random.randrange(start, stop)

    def randint(self, a: int, b: int) -> int:
        """An int in [a, b], both ends included."""
        return self._random.randint(a, b)

    def choice(self, seq: Sequence[T]) -> T:
        """One element of a non-empty sequence."""
        return self._random.choice(seq)

    def shuffle(self, items: MutableSequence[T]) -> None:
        """Shuffles `items` in place."""
        self._random.shuffle(items)

    def sample(self, population: Sequence[T], k: int) -> list[T]:
        """`k` distinct elements of `population`."""
        return self._random.sample(population, k)

    def getrandbits(self, k: int) -> int:
        """A non-negative int with `k` random bits."""
        return self._random.getrandbits(k)

    def randbytes(self, n: int) -> bytes:
        """`n` random bytes."""
        return self._random.randbytes(n)

    def uuid4(self) -> uuid.UUID:
        """A version-4 UUID drawn from this stream."""
        return uuid.UUID(bytes=self._random.randbytes(16), version=4)

    def make_id(self, prefix: str) -> str:
        """A Letta-style id such as `agent-6f1c...`: `prefix`, a dash, a UUID4."""
        return f"{prefix}-{self.uuid4()}"

    def __repr__(self) -> str:
        return f"Rng(seed={self._seed})"
