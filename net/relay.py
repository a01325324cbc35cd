"""Serving from behind a NAT: a slot on a relay, and the circuit addresses through it.

A peer that nobody can dial reserves a slot on a reachable peer (libp2p circuit relay v2): the relay
keeps the peer's outgoing connection, and a caller that dials ``<relay address>/p2p-circuit/p2p/<peer>``
gets a connection relayed through it. hivemind's p2pd has the relay service (``-relayService``, on
by default, started only once the daemon counts itself publicly reachable: see below) and the
client side that accepts relayed connections
(``-relay``), but its own reservation logic (``-autoRelay``) waits for four relay candidates or three
minutes before reserving anything, and the daemon's control API has no "reserve" call. So the
reservation is made here: one ``RESERVE`` message on the relay's hop protocol, over a stream the
daemon opens, renewed before it expires; the relay holds it as long as the peer's connection lives.

Wire format (libp2p specs, relay/circuit-v2.md): varint-length-prefixed protobuf ``HopMessage``
``{type = 1 (RESERVE = 0, STATUS = 2), reservation = 3 {expire = 1, addrs = 2}, limit = 4 {duration = 1,
data = 2}, status = 5 (OK = 100)}``; three fields are all this needs, so they are read by hand rather
than by a generated module.

The limit a relay announces is the one it applies to every connection it relays, and hivemind's
p2pd (v0.5.0.hivemind1) can run the wrong one: with ``-relay=1`` it starts a relay service with the
limits of its ``-relay*`` flags when it counts itself public, *and* a second one with libp2p's
defaults (``Daemon.EnableRelayV2``: 2 minutes and 128 KiB per relayed connection) right after it
starts; both serve the same protocol, and whichever registers last answers. Forced public
(``force_reachability``), a node's configured service started at once on a goroutine and lost that
race about one start in three (2 of 6 in a row on loopback; in the namespace runs, every relayed
transfer over 128 KiB, one stage's activations or weights, was reset); restarting until it won did
not help under load (5 of 5 starts lost in a row). So a relay is not forced public: its AutoNAT
finds it public (a dial-back from a peer running the AutoNAT service, which every relaying node
does; seconds after it started in the namespace tests), and only then does its configured service start, after
the default one, and answer. Until then, and on a node AutoNAT never finds public (a private
address), the relay answers with the defaults, and a peer behind NAT refuses a slot whose limit is
below ``core.config.MIN_RELAY_BYTES`` (naming the relay and the figure) and asks again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, NamedTuple

from hivemind.p2p import P2P, PeerID
from multiaddr import Multiaddr

from core.config import MIN_RELAY_BYTES
from core.errors import PeerUnavailable

__all__ = ["HOP_PROTOCOL", "RelayAnswer", "RelaySlot", "Reservation", "reserve", "circuit_address",
           "is_relayed", "relay_of", "parse_reply"]

logger = logging.getLogger(__name__)

HOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/hop"
_RESERVE = b"\x08\x00"  # HopMessage{type: RESERVE}
_STATUS_OK = 100
_STATUS_NAMES = {100: "OK", 200: "RESERVATION_REFUSED", 201: "RESOURCE_LIMIT_EXCEEDED", 202: "PERMISSION_DENIED",
                 203: "CONNECTION_FAILED", 204: "NO_RESERVATION", 400: "MALFORMED_MESSAGE", 401: "UNEXPECTED_MESSAGE"}


@dataclass(frozen=True)
class Reservation:
    """A slot on ``relay`` (its peer id, dialed at ``relay_maddr``) until ``expires`` (unix time)."""

    relay: str
    relay_maddr: str
    expires: float
    data_limit: int = 0  # bytes a relayed connection carries each way; 0: no limit

    def address(self, peer_id: str) -> str:
        return circuit_address(self.relay_maddr, self.relay, peer_id)


def circuit_address(relay_maddr: str, relay: str, peer_id: str) -> str:
    """The address a caller dials to reach ``peer_id`` through ``relay`` (listening at ``relay_maddr``)."""
    base = relay_maddr.split("/p2p/", 1)[0]
    return f"{base}/p2p/{relay}/p2p-circuit/p2p/{peer_id}"


def is_relayed(maddr: str) -> bool:
    return "/p2p-circuit" in maddr


def relay_of(maddr: str) -> str | None:
    """The relay's peer id in a circuit address, None for a direct one."""
    if not is_relayed(maddr):
        return None
    return maddr.split("/p2p-circuit", 1)[0].rsplit("/p2p/", 1)[1]


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data):
            raise ValueError("truncated varint")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


def _fields(data: bytes) -> dict[int, int | bytes]:
    """The last value of each field of a protobuf message (varints and length-delimited only)."""
    fields: dict[int, int | bytes] = {}
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, kind = key >> 3, key & 7
        if kind == 0:
            fields[number], at = _varint(data, at)
        elif kind == 2:
            size, at = _varint(data, at)
            fields[number], at = data[at:at + size], at + size
        else:
            raise ValueError(f"unexpected protobuf wire type {kind} in a relay's answer")
    return fields


class RelayAnswer(NamedTuple):
    """A relay's answer to RESERVE: its status, the slot's expiry (unix time, 0 if none), and the
    limit of each connection it relays (seconds, bytes each way; 0: none)."""

    status: int
    expires: float
    seconds: int = 0
    data: int = 0


def parse_reply(reply: bytes) -> RelayAnswer:
    """A relay's answer to RESERVE; ``ValueError`` if malformed."""
    fields = _fields(reply)
    status = fields.get(5)
    if not isinstance(status, int):
        raise ValueError("a relay's answer without a status")
    reservation, limit = fields.get(3), fields.get(4)
    expires = _fields(reservation).get(1, 0) if isinstance(reservation, bytes) else 0
    limits = _fields(limit) if isinstance(limit, bytes) else {}
    return RelayAnswer(status, float(expires), int(limits.get(1, 0)), int(limits.get(2, 0)))


async def reserve(p2p: P2P, relay_maddr: str, *, timeout: float = 10.0,
                  min_data: int = MIN_RELAY_BYTES) -> Reservation:
    """Connect to the relay at ``relay_maddr`` (``.../p2p/<id>``) and reserve a slot on it; raises
    ``PeerUnavailable`` naming the relay and why when it cannot be reached, refuses, or would cut
    each relayed connection after fewer than ``min_data`` bytes."""
    relay = relay_maddr.rsplit("/p2p/", 1)[1]
    peer = PeerID.from_base58(relay)
    writer = None
    try:
        await asyncio.wait_for(p2p._client.connect(peer, [Multiaddr(relay_maddr.split("/p2p/", 1)[0])]), timeout)
        _, reader, writer = await asyncio.wait_for(p2p._client.stream_open(peer, [HOP_PROTOCOL]), timeout)
        writer.write(bytes([len(_RESERVE)]) + _RESERVE)
        await writer.drain()
        head = await asyncio.wait_for(reader.read(10), timeout)
        size, at = _varint(head, 0)
        body = head[at:] + (await asyncio.wait_for(reader.readexactly(size - len(head) + at), timeout)
                            if size > len(head) - at else b"")
        answer = parse_reply(body[:size])
    except Exception as e:  # ControlFailure (unreachable, protocol not served), a timeout, a cut or malformed answer
        raise PeerUnavailable(f"no slot on relay {relay[-8:]}: {type(e).__name__}: {str(e)[:200]}") from None
    finally:
        if writer is not None:
            writer.close()
    if answer.status != _STATUS_OK:
        raise PeerUnavailable(f"relay {relay[-8:]} refused a slot: {_STATUS_NAMES.get(answer.status, answer.status)}")
    if answer.data and answer.data < min_data:
        raise PeerUnavailable(f"relay {relay[-8:]} would reset every relayed connection after {answer.data:,} bytes "
                              f"(at least {min_data:,} needed): its relay service runs libp2p's default limits")
    return Reservation(relay, relay_maddr, answer.expires or time.time() + 3600, answer.data)


class RelaySlot:
    """Keeps this node reachable through a relay: reserves a slot on the first candidate that gives
    one, renews it at half its life (at most every ``renew_every`` s), and on a failed renewal (the
    relay died) moves to the next candidate. ``on_change(reservation or None)`` is told each move."""

    def __init__(self, p2p: P2P, peer_id: str, candidates: Callable[[], Awaitable[list[str]]],
                 on_change: Callable[[Reservation | None], None], *, renew_every: float = 5.0):
        self.p2p, self.peer_id = p2p, peer_id
        self.candidates, self.on_change, self.renew_every = candidates, on_change, renew_every
        self.current: Reservation | None = None
        self.last_error = ""

    async def acquire(self) -> Reservation | None:
        """A slot on the first candidate (the current relay first) that gives one; None if none did."""
        order = await self.candidates()
        if self.current is not None and self.current.relay_maddr in order:
            order.remove(self.current.relay_maddr)
            order.insert(0, self.current.relay_maddr)
        for maddr in order:
            try:
                reservation = await reserve(self.p2p, maddr)
            except PeerUnavailable as e:
                self.last_error = str(e)
                logger.info("%s", e)
                continue
            if self.current is None or reservation.relay != self.current.relay:
                logger.info("reachable through relay %s: %s (%s)", reservation.relay[-8:], reservation.address(self.peer_id),
                            f"up to {reservation.data_limit:,} bytes per relayed connection" if reservation.data_limit
                            else "no limit per relayed connection")
                self.current = reservation
                self.on_change(reservation)
            self.current = reservation
            return reservation
        if self.current is not None:
            self.current = None
            self.on_change(None)
        return None

    async def keep(self) -> None:
        """Renew forever (a task); each round bounded, failures logged with the attempt number."""
        attempt = 0
        while True:
            held = self.current
            wait = self.renew_every if held is None else min(self.renew_every, max(1.0, (held.expires - time.time()) / 2))
            await asyncio.sleep(wait if held is not None else min(self.renew_every, 2.0 ** attempt))
            if await self.acquire() is None:
                attempt = min(attempt + 1, 5)
                logger.warning("no relay gives this peer a slot (attempt %d): %s", attempt, self.last_error)
            else:
                attempt = 0
