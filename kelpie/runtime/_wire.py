"""How invocations and their replies cross between nodes: JSON, with errors by name.

Messages and replies are JSON values (None, bool, int, float, str, lists, and
dicts with str keys), whichever node the actor runs on, so an actor sees the
same message wherever it was placed: a tuple arrives as a list, an int dict key
as a str. `encode_value` refuses anything else with `InvalidMessage`.

A request is one JSON object: `{"a": [namespace, id], "k": key, "m": message}`,
with `"c": 1` when it comes from a client (route it) rather than a node, and
`"i": request id` naming one send (duplicates share it). A
reply is `{"v": value}`, or `{"e": error class name, "d": detail,
"t": the actor's own error type (ActorFailed only)}`, or `{"x": error class name,
"d": detail}`: the node did not handle the call at all (route it again), or
`{"r": address, "n": epoch}`: the actor is owned by that node, ask there. Errors travel by class
name and are raised on the calling node as the same Kelpie class; a name the
caller does not know arrives as `ActorFailed`.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from kelpie import env, storage
from kelpie.core import KelpieError
from kelpie.env import RemoteFailure
from kelpie.runtime import _errors
from kelpie.runtime._ids import ActorId, InvalidActorId

_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)
_DECODER = json.JSONDecoder()
#: The longest idempotency key, in characters.
IDEMPOTENCY_KEY_MAX_CHARS = 256


def _known_errors() -> dict[str, type[KelpieError]]:
    known: dict[str, type[KelpieError]] = {}
    for module in (_errors, storage, env):
        for name in sorted(vars(module)):
            value = vars(module)[name]
            if isinstance(value, type) and issubclass(value, KelpieError):
                known[value.__name__] = value
    return known


_KNOWN = _known_errors()
InvalidMessage = _errors.InvalidMessage


def encode_value(value: Any, what: str) -> bytes:
    """`value` as JSON bytes, or `InvalidMessage` naming `what` (e.g. "the message to a/b")."""
    try:
        return _ENCODER.encode(value).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidMessage(f"{what} is not a JSON value: {exc}") from None


def decode_value(data: bytes) -> Any:
    return _DECODER.decode(data.decode())


#: Keys the runtime makes for calls forwarded without one; callers may not use the prefix.
GENERATED_KEY_PREFIX = "kelpie:"


def check_idempotency_key(key: object, *, generated: bool = False) -> None:
    """`InvalidMessage` unless `key` is None or a valid key (`generated`: the runtime's own)."""
    if key is None:
        return
    if not isinstance(key, str) or not key or len(key) > IDEMPOTENCY_KEY_MAX_CHARS:
        raise InvalidMessage(
            f"an idempotency key is a non-empty str of at most {IDEMPOTENCY_KEY_MAX_CHARS} "
            f"characters, got {key!r:.80}"
        )
    if not generated and key.startswith(GENERATED_KEY_PREFIX):
        raise InvalidMessage(
            f"idempotency keys starting with {GENERATED_KEY_PREFIX!r} are the runtime's own"
        )


def encode_request(
    actor_id: ActorId,
    message: bytes,
    key: str | None,
    *,
    route: bool = False,
    request_id: str | None = None,
) -> bytes:
    """An invocation sent to a node; `message` is already JSON (`encode_value`).

    `route`: a client's call, which the node routes to the actor wherever it
    lives; otherwise a call forwarded by another node, for an actor it believes
    this node owns (the node takes it, or redirects). `request_id` names this
    one send: a copy the network duplicated carries the same id and gets the
    same answer as the first (a retry is a new send, with a new id).
    """
    head: dict[str, Any] = {"a": [actor_id.namespace, actor_id.id], "k": key}
    if route:
        head["c"] = 1
    if request_id is not None:
        head["i"] = request_id
    return b'{"m":' + message + b"," + _ENCODER.encode(head)[1:].encode()


@attrs.frozen
class Request:
    """An invocation a node received."""

    actor_id: ActorId
    message: Any
    key: str | None
    route: bool
    request_id: str | None


def decode_request(data: bytes) -> Request:
    """The invocation in `data`, or `InvalidMessage`."""
    try:
        obj = decode_value(data)
        namespace, id_ = obj["a"]
        key = obj["k"]
        message = obj["m"]
        request_id = obj.get("i")
        actor_id = ActorId(namespace, id_)
        check_idempotency_key(key, generated=True)
        check_idempotency_key(request_id, generated=True)  # the same shape
    except (ValueError, KeyError, TypeError, InvalidActorId) as exc:
        raise InvalidMessage(f"malformed request between nodes: {exc}") from None
    return Request(actor_id, message, key, bool(obj.get("c")), request_id)


def reply_value(value: bytes) -> bytes:
    return b'{"v":' + value + b"}"


def reply_error(exc: BaseException) -> bytes:
    """The call failed with `exc` (whether it was applied is what `exc` says)."""
    obj: dict[str, Any] = {"e": type(exc).__name__, "d": str(exc)}
    if isinstance(exc, _errors.ActorFailed):
        obj["t"] = exc.error_type
    return _ENCODER.encode(obj).encode()


def reply_not_handled(exc: KelpieError) -> bytes:
    """The node did not handle the call at all (nothing applied): route it again."""
    return _ENCODER.encode({"x": type(exc).__name__, "d": str(exc)}).encode()


def reply_redirect(address: str, epoch: int) -> bytes:
    return _ENCODER.encode({"r": address, "n": epoch}).encode()


@attrs.frozen
class Redirect:
    """The replying node does not own the actor; the node at `address` (epoch) does."""

    address: str
    epoch: int


@attrs.frozen
class Value:
    """A reply's value."""

    value: Any


@attrs.frozen
class NotHandled:
    """The replying node did not handle the call; `error` says why."""

    error: KelpieError


def decode_reply(data: bytes) -> Value | Redirect | NotHandled | KelpieError:
    """The reply's value, a redirect, a refusal, or the error to raise."""
    try:
        obj = decode_value(data)
        if "v" in obj:
            return Value(obj["v"])
        if "r" in obj:
            return Redirect(str(obj["r"]), int(obj["n"]))
        refused = "x" in obj
        name, detail = str(obj["x" if refused else "e"]), str(obj["d"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # The peer ran something and answered nonsense: whether it applied is unknown.
        return RemoteFailure(f"a malformed reply between nodes: {exc}")
    cls = _KNOWN.get(name)
    if cls is None or cls is _errors.ActorFailed:
        error: KelpieError = _errors.ActorFailed(detail, error_type=str(obj.get("t", name)))
    else:
        try:
            error = cls(detail)
        except TypeError:
            error = _errors.ActorFailed(detail, error_type=name)
    return NotHandled(error) if refused else error
