"""What every swarm RPC shares: the message base, the reply envelope, and the handler guard.

A call carries a message (msgpack of its JSON form, ``Message`` subclasses per protocol) plus a list
of tensors. A reply is ``{"ok": <response message>}`` or ``{"error": {"code": <SwarmError class
name>, "message": ...}}``; the caller re-raises the named error (``core.errors.error_from_wire``), so
the code is a class name and never depends on a module path.

Every service registers its ``rpc_*`` handlers through ``guarded``: a failure costs one request,
never the node.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Awaitable, Callable

from pydantic import ValidationError

from core.errors import BadRequest, ProtocolMismatch, SwarmError, error_from_wire
from core.messages import PROTOCOL_VERSION, FrozenModel

__all__ = ["Message", "Raw", "Outgoing", "wire_form", "parse_request", "parsing", "ok_reply", "error_reply", "guarded",
           "parse_reply"]

Rpc = Callable[[Any, list], Awaitable[tuple[dict, list]]]


class Message(FrozenModel):
    """An RPC request or response: frozen, strict, and stamped with the protocol version it speaks.
    A protocol with its own version (delegation) overrides the ``version`` default."""

    version: int = PROTOCOL_VERSION


class Raw:
    """A payload a call sends as it is, not a message: what no model allows (fuzzing, probes of
    malformed input, a test's bare echo). Everything else a node sends is a ``Message``."""

    __slots__ = ("payload",)

    def __init__(self, payload: Any):
        self.payload = payload

    def __repr__(self) -> str:
        return f"Raw({self.payload!r})"


Outgoing = FrozenModel | Raw
"""What ``Transport.call`` sends: a message (a ``Message``, or a protocol's own frozen model such as the
ledger's and the token exchange's), dumped to its JSON form on the way out, or a ``Raw`` payload."""


def wire_form(message: Outgoing) -> Any:
    """What goes on the wire for ``message`` (msgpack of it): a message's JSON form, a raw payload as is."""
    if isinstance(message, FrozenModel):
        return message.model_dump(mode="json")
    if isinstance(message, Raw):
        return message.payload
    raise TypeError(f"a call sends a Message (or Raw for a payload no message allows), got {type(message).__name__}")


def parse_request(model: type[Message], payload: Any, *, version: int = PROTOCOL_VERSION,
                  protocol: str = "protocol") -> Message:
    """Validate a decoded request; anything malformed becomes a ``BadRequest`` naming the field, a
    request of another ``version`` of ``protocol`` a ``ProtocolMismatch``."""
    if not isinstance(payload, dict):
        raise BadRequest(f"{model.__name__}: expected a map, got {type(payload).__name__}")
    got = payload.get("version", version)
    if got != version:
        raise ProtocolMismatch(f"{protocol} version {got!r}; this node speaks {version}")
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "message"
        raise BadRequest(f"{model.__name__}: {where}: {first['msg']}") from None


def parsing(model: type[Message], rpc: Callable[[Any, list], Awaitable[tuple[dict, list]]]) -> Rpc:
    """``rpc``, which takes its request parsed, as a handler of the decoded message: the message is
    parsed into ``model`` first (``parse_request``). It keeps ``rpc``'s name, which guards log."""

    @functools.wraps(rpc)
    async def handler(message: Any, tensors: list) -> tuple[dict, list]:
        return await rpc(parse_request(model, message), tensors)

    return handler


def ok_reply(message: Message) -> dict:
    return {"ok": message.model_dump(mode="json")}


def error_reply(error: SwarmError) -> dict:
    return {"error": {"code": type(error).__name__, "message": str(error)}}


def guarded(rpc: Rpc, log: logging.Logger, *, outcome: Callable[[Exception | None], None] | None = None) -> Rpc:
    """``rpc`` as a handler whose failure costs one request, never the node: a ``SwarmError`` becomes
    its error reply, anything else (a bug, a full disk) an internal-error reply, logged with its trace.
    ``outcome`` (if given) hears of every request: None when it was served, else the error replied."""

    def tell(error: Exception | None) -> None:
        if outcome is not None:
            outcome(error)

    async def handler(message: Any, tensors: list) -> tuple[dict, list]:
        try:
            result = await rpc(message, tensors)
        except SwarmError as e:
            tell(e)
            log.info("%s refused: %s: %s", rpc.__name__, type(e).__name__, e)
            return error_reply(e), []
        except Exception as e:
            tell(e)
            log.exception("%s failed", rpc.__name__)
            return error_reply(SwarmError(f"internal error in {rpc.__name__}: {type(e).__name__}: {e}")), []
        tell(None)
        return result

    return handler


def parse_reply(model: type[Message], payload: Any) -> Message:
    """Turn a reply into its message, or raise the error the peer reported."""
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        error = payload["error"]
        raise error_from_wire(str(error.get("code")), str(error.get("message")))
    if not isinstance(payload, dict) or "ok" not in payload:
        raise ProtocolMismatch(f"unreadable reply to {model.__name__}: {str(payload)[:200]}")
    try:
        return model.model_validate(payload["ok"])
    except ValidationError as e:
        raise ProtocolMismatch(f"malformed {model.__name__}: {e.errors()[0]['msg']}") from None
