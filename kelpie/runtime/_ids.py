"""Actor identity: `ActorId(namespace, id)`, validated, with its place in the store."""

from __future__ import annotations

import re
from typing import Any

import attrs

from kelpie.core import KelpieError
from kelpie.storage import pack, tuple_range

#: The longest namespace or id, in characters.
ACTOR_ID_PART_MAX_CHARS = 128

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")


class InvalidActorId(KelpieError):
    """A namespace or id is empty, too long, or has a character outside [A-Za-z0-9._:@-]."""


def _check_part(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise InvalidActorId(f"an actor's {name} is a str, got {type(value).__name__}")
    if not value:
        raise InvalidActorId(f"an actor's {name} must not be empty")
    if len(value) > ACTOR_ID_PART_MAX_CHARS:
        raise InvalidActorId(
            f"an actor's {name} has {len(value)} characters, over the limit of "
            f"{ACTOR_ID_PART_MAX_CHARS}"
        )
    if not _PART.fullmatch(value):
        raise InvalidActorId(
            f"an actor's {name} {value!r} must start with a letter or digit and hold only "
            "letters, digits and . _ : @ -"
        )


@attrs.frozen(order=True, cache_hash=True)
class ActorId:
    """One actor: `namespace` (its kind, e.g. "agent") and `id` (which one)."""

    namespace: str
    id: str

    def __attrs_post_init__(self) -> None:
        _check_part("namespace", self.namespace)
        _check_part("id", self.id)

    def key(self, *parts: Any) -> bytes:
        """A store key of this actor's, under ("actor", namespace, id)."""
        return pack(("actor", self.namespace, self.id, *parts))

    def range(self, *parts: Any) -> tuple[bytes, bytes]:
        """[begin, end) of every key of this actor's under `parts` (`key(*parts, ...)`)."""
        return tuple_range(("actor", self.namespace, self.id, *parts))

    def __str__(self) -> str:
        return f"{self.namespace}/{self.id}"
