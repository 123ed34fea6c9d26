"""kelpie.env.Rng: seeded, forkable, and the source of ids."""

from __future__ import annotations

import uuid

import pytest

from kelpie.env import Rng, derive_seed


def test_same_seed_gives_the_same_stream() -> None:
    """Draws from two Rngs with one seed are identical."""
    a, b = Rng(42), Rng(42)
    assert [a.random() for _ in range(20)] == [b.random() for _ in range(20)]
    assert a.randbytes(32) == b.randbytes(32)


def test_different_seeds_give_different_streams() -> None:
    """Draws from Rngs with different seeds differ."""
    assert [Rng(1).random() for _ in range(3)] != [Rng(2).random() for _ in range(3)]


def test_fork_does_not_depend_on_parent_draws() -> None:
    """A child stream is a function of the parent's seed and the label only."""
    parent = Rng(7)
    before = parent.fork("storage").random()
    for _ in range(100):
        parent.random()
    assert parent.fork("storage").random() == before


def test_forks_with_different_labels_are_independent() -> None:
    """Different labels give different streams; the same label gives the same stream."""
    parent = Rng(7)
    assert parent.fork("a").getrandbits(64) != parent.fork("b").getrandbits(64)
    assert parent.fork("a").seed == parent.fork("a").seed


def test_derive_seed_is_stable_across_processes() -> None:
    """Fork seeds use BLAKE2b, not the salted builtin hash: this value never changes."""
    assert derive_seed(0, "schedule") == 0xE87F231026DFCD01
    assert 0 <= derive_seed(123, "x") < 2**64


def test_ids_are_letta_style_and_seeded() -> None:
    """make_id gives '<prefix>-<uuid4>' drawn from the stream."""
    ident = Rng(5).make_id("agent")
    prefix, _, rest = ident.partition("-")
    assert prefix == "agent"
    assert uuid.UUID(rest).version == 4
    assert Rng(5).make_id("agent") == ident
    assert Rng(6).make_id("agent") != ident


def test_rejects_negative_seed() -> None:
    """A negative seed is refused with a clear message."""
    with pytest.raises(ValueError, match="non-negative"):
        Rng(-1)


def test_helpers_stay_in_range() -> None:
    """randint, randrange, uniform and choice stay within their bounds."""
    rng = Rng(9)
    for _ in range(200):
        assert 3 <= rng.randint(3, 5) <= 5
        assert 0 <= rng.randrange(4) < 4
        assert 2 <= rng.randrange(2, 4) < 4
        assert 1.0 <= rng.uniform(1.0, 2.0) <= 2.0
        assert rng.choice("xyz") in "xyz"
        assert rng.expovariate(2.0) >= 0
    items = list(range(10))
    rng.shuffle(items)
    assert sorted(items) == list(range(10))
    assert len(set(rng.sample(range(10), 4))) == 4
