"""A direct data channel: calls carried over plain TCP (TLS 1.3 by default) between two peers that can
dial each other, beside the libp2p stream, which stays the control plane and the fallback.

Why: a call through the p2p daemon crosses two extra processes and hivemind's protobuf framing; on
loopback that costs several times a raw TCP echo of the same bytes (``benchmarks/hop_latency.py``).

How a caller gets a channel (``ChannelClient``), per callee:

1. **Offer, over libp2p.** ``swarm.channel.open`` (``ChannelOpen``: the caller's DHT record key) is
   answered with a ``ChannelOffer``: where the callee's channel listens, the SHA-256 fingerprint of its
   ephemeral TLS certificate, its own DHT record key, and a ticket bound to the caller's libp2p peer id
   (which libp2p's secure channel authenticated) and record key. A callee without a channel (an
   older node, a bootstrap) answers with an error: the caller uses libp2p for that callee a while. On a
   keyed run the offer is gated like any call: a caller that has not presented its token is refused
   and uses libp2p for that call (its token's presentation), then asks again.
2. **Dial.** TCP to the offered address; with TLS, the callee's certificate must have the offered
   fingerprint (pinned: no CA involved). A refused or timed-out dial (NAT) falls back to libp2p.
3. **Handshake, signed by the record keys, with fresh nonces** (``_statement``). The callee sends a
   nonce; the caller answers with its peer id, its ticket, its nonce and its signature over both
   peer ids, the certificate fingerprint and both nonces; the callee checks that the ticket was issued
   to that peer id and that the signature verifies with the record key the ticket holds, then signs
   the same statement back, which the caller checks with the offered key. A caller that claims
   another identity, or cannot sign for the key it registered, is refused (``AuthRejected``) and
   closed.

Then a connection carries one call at a time (the client keeps a small pool per callee):
``[header frame][tensor bytes ...]`` each way. The header is the transport's own frame (hivemind's
marker + length + ``ExpertRequest``/``ExpertResponse``, read by ``net.framing.read_frame`` with its
limits): ``uid`` names the method, ``metadata`` is the transport's envelope ``[message, number of
tensors]`` (``net.transport``), and each ``tensors`` entry describes one tensor (dtype, shape, empty
buffer). The tensors' bytes follow raw, back to back: sent straight from the tensors' memory
(``writelines`` of memoryviews), read into one buffer each. Requests pass the same admission as a
libp2p stream (the caller's limits and the run's gate, with the caller's authenticated peer id) and
the same handlers; a malformed header, an undecodable envelope, an unknown dtype or a size over the
method's limit is answered with its named error and the connection is closed (its byte stream can
no longer be trusted to be in step); the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import logging
import math
import os
import secrets
import socket
import ssl
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, Sequence

import msgpack
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from pydantic import Field

from core.errors import AuthRejected, BadRequest, CapacityExceeded, PeerUnavailable, SwarmError
from core.types import PeerId
from net.admission import MAX_STREAMS_PER_CALLER, Ticket
from net.framing import IDLE_SECONDS, envelope, raw_bytes, read_exactly, read_frame
from net.rpc import Message, error_reply

__all__ = ["OPEN", "ChannelOpen", "ChannelOffer", "Identity", "ChannelServer", "ChannelClient", "Served", "Host",
           "Header", "header_frame", "read_header", "read_tensors", "self_signed", "channel_hosts",
           "server_context", "client_context"]

logger = logging.getLogger(__name__)

OPEN = "swarm.channel.open"
TICKET_SECONDS = 3600.0
DIAL_SECONDS = 3.0
RETRY_SECONDS = 60.0  # after a refused dial or a callee without a channel, libp2p alone for this long
MAX_TICKETS = 4096
MAX_CONNECTIONS_PER_CALLER = MAX_STREAMS_PER_CALLER  # each carries one call at a time, as a stream does
IDLE_PER_PEER = 4  # connections kept open per callee between calls
LINGER_SECONDS = 2.0  # how long a refusing side reads what the caller sent before it closes (`_refuse`)
_NONCE = 32
_UNCOMPRESSED = runtime_pb2.CompressionType.NONE  # an attribute of protobuf's enum wrapper is a slow lookup
_JOINED = 64 << 10  # a call this small goes out as one write: one TLS record, one segment, one wake-up
_BUFFER = 4 << 20  # a reader's buffer: a 2 MiB activation arrives without pausing the socket every 128 KiB


class ChannelOpen(Message):
    """Ask a peer for its channel. Gated like every method on a keyed run: a caller presents its token
    (on libp2p) first, and the channel then checks the gate again on every call."""

    public_key: str = Field(min_length=1, max_length=2048, description="base64 of the caller's DHT record key")


class ChannelOffer(Message):
    hosts: list[str] = Field(min_length=1, max_length=8)
    port: int = Field(ge=1, le=65535)
    tls: bool
    fingerprint: str = Field(max_length=64, description="hex SHA-256 of the TLS certificate (DER); empty without TLS")
    public_key: str = Field(min_length=1, max_length=2048, description="base64 of the callee's DHT record key")
    ticket: str = Field(min_length=16, max_length=128)


@dataclass(frozen=True)
class Identity:
    """A node as the channel knows it: its libp2p peer id and the RSA key that signs its DHT records."""

    peer_id: PeerId
    key: RSAPrivateKey

    @property
    def public_key(self) -> str:
        return base64.b64encode(self.key.get_public_key().to_bytes()).decode()


@dataclass
class Served:
    """One method the channel serves: the transport's own handler and limits (``P2PTransport.serve``)."""

    handler: Callable[[Any, list[torch.Tensor]], Awaitable[tuple[dict, list[torch.Tensor]]]]
    limit: int | None
    public: bool


def _statement(server: PeerId, client: PeerId, fingerprint: str, server_nonce: bytes, client_nonce: bytes,
               side: str) -> bytes:
    return b"|".join([b"swarm-channel-v1", side.encode(), server.encode(), client.encode(), fingerprint.encode(),
                      server_nonce, client_nonce])


def self_signed() -> tuple[bytes, bytes]:
    """An ephemeral self-signed certificate and its key (PEM), made at start: its fingerprint, not a CA,
    is what the other side trusts (it learns it from the offer over libp2p)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swarm-channel")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def server_context(cert: bytes, key: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with tempfile.TemporaryDirectory() as folder:  # ssl loads a chain from files only
        cert_path, key_path = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert)
        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(key)
        context.load_cert_chain(cert_path, key_path)
    return context


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the certificate is checked by its pinned fingerprint instead
    return context


def _fingerprint_of(cert_pem: bytes) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert_pem.decode())).hexdigest()


def header_frame(frame_type: type, uid: str, message: Any, tensors: Sequence[torch.Tensor]) -> tuple[bytes, list]:
    """The header of a call or reply (marker + length + protobuf, as ``net.framing`` reads it) and
    each tensor's bytes to send after it, as memoryviews of the tensors' own memory (no copy)."""
    frame = frame_type(metadata=msgpack.packb([message, len(tensors)]))
    if uid:
        frame.uid = uid
    views = []
    for tensor in tensors:
        view, name = raw_bytes(tensor)
        frame.tensors.add(size=tensor.shape, dtype=name, chunks=1, compression=_UNCOMPRESSED)
        if len(view):
            views.append(view)
    body = frame.SerializeToString()
    return P2P.MESSAGE_MARKER + len(body).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + body, views


async def _send(writer: asyncio.StreamWriter, frame_type: type, uid: str, message: Any,
                tensors: Sequence[torch.Tensor]) -> None:
    header, views = header_frame(frame_type, uid, message, tensors)
    if sum(len(view) for view in views) <= _JOINED:
        writer.write(b"".join([header, *views]))
    else:
        writer.writelines([header, *views])
    await writer.drain()


@dataclass
class Header:
    """A call's or reply's header, read and checked: the method (a call), the message, and each
    announced tensor's dtype, shape and byte size."""

    uid: str
    message: Any
    layout: list[tuple[torch.dtype, torch.Size, int]]

    @property
    def size(self) -> int:
        return sum(size for _, _, size in self.layout)


async def read_header(reader: asyncio.StreamReader, frame_type: type, *, broken: Callable[[str], SwarmError],
                      idle: float | None) -> Header | None:
    """The next header on a connection (None: the other side closed between calls), read by
    ``net.framing.read_frame`` (its frame limit, idle timeout and error frames); a malformed one
    is a ``BadRequest`` naming what is wrong."""
    frame = await read_frame(reader, frame_type, refused=broken, broken=broken, idle=idle)
    if frame is None:
        return None
    message, expected = envelope(frame.metadata)
    if expected != len(frame.tensors):
        raise BadRequest(f"the envelope announces {expected} tensor(s), the header describes {len(frame.tensors)}")
    layout = []
    for index, part in enumerate(frame.tensors):
        dtype = getattr(torch, part.dtype, None)
        if not isinstance(dtype, torch.dtype) or part.compression != _UNCOMPRESSED or part.buffer:
            raise BadRequest(f"tensor #{index}: expected a dtype, no compression and no inline bytes, "
                             f"got dtype {part.dtype[:40]!r}")
        if len(part.size) > 16 or any(dim < 0 or dim >= 1 << 40 for dim in part.size):
            raise BadRequest(f"tensor #{index}: invalid shape {list(part.size)[:17]}")
        shape = torch.Size(part.size)  # its size in Python ints: a product past int64 is refused by the limit
        layout.append((dtype, shape, math.prod(part.size) * dtype.itemsize))
    return Header(frame.uid if frame_type is runtime_pb2.ExpertRequest else "", message, layout)


async def read_tensors(reader: asyncio.StreamReader, header: Header, *, limit: int | None,
                       broken: Callable[[str], SwarmError], idle: float | None,
                       reserve: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """The tensors ``header`` announces, each read into memory of its own. Over ``limit`` bytes in all
    is ``broken(why)`` and ``reserve(bytes)`` (the caller's budget) may refuse, both before a byte is
    read; a connection that closes or stalls inside a tensor is ``broken(why)``."""
    if limit is not None and header.size > limit:
        raise broken(f"request larger than {limit >> 20} MiB" if limit >= 1 << 20 else
                     f"request of {header.size} bytes, over this method's {limit} bytes")
    if reserve is not None:
        reserve(header.size)
    if header.size <= _JOINED:
        return await _read_joined(reader, header, broken=broken, idle=idle)
    tensors = []
    for dtype, shape, size in header.layout:
        try:
            data = await read_exactly(reader, size, idle, broken) if size else b""
        except asyncio.IncompleteReadError:
            raise broken(f"the connection closed inside a tensor of {size} bytes") from None
        out = torch.empty(size, dtype=torch.uint8)
        if size:
            memoryview(out.numpy())[:] = data
        tensors.append(out.view(dtype).reshape(shape))
    return tensors


async def _read_joined(reader: asyncio.StreamReader, header: Header, *, broken: Callable[[str], SwarmError],
                       idle: float | None) -> list[torch.Tensor]:
    """A small call's tensors (sent joined, ``_JOINED``) in one read and one copy into a buffer they
    share: one await and one idle timer for all of them instead of one each, a few tens of
    microseconds of a 1-token hop. A tensor whose offset in it does not suit its dtype is copied out."""
    try:
        data = bytearray(await read_exactly(reader, header.size, idle, broken)) if header.size else bytearray()
    except asyncio.IncompleteReadError:
        raise broken(f"the connection closed inside {header.size} bytes of tensors") from None
    tensors, offset = [], 0
    for dtype, shape, size in header.layout:
        if not size:
            tensors.append(torch.empty(shape, dtype=dtype))
            continue
        tensor = torch.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=offset).view(shape)
        tensors.append(tensor if offset % dtype.itemsize == 0 else tensor.clone())
        offset += size
    return tensors


class Host(Protocol):
    """What a channel serves through (``net.transport.P2PTransport``): its admission and handlers."""

    def admit(self, caller: PeerId, method: str) -> tuple[Served, Ticket]: ...

    async def run(self, method: str, served: Served, caller: PeerId, message: Any,
                  tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]: ...


class _Inherited:
    """This process's channel sockets, closed in every child it forks (hivemind forks its DHT and
    averager processes from a running peer). A child's copy of a closed listener would go on
    accepting connections that nobody answers, and its copy of a closed connection would keep it
    open, so a caller would wait for a reply instead of seeing the peer go. Each socket is known by
    its fd and its addresses, checked before closing, so an entry left behind never closes another fd."""

    def __init__(self) -> None:
        self._sockets: dict[int, tuple] = {}
        os.register_at_fork(after_in_child=self._close_all)

    def add(self, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self._sockets[sock.fileno()] = _addresses(sock)

    def discard(self, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self._sockets.pop(sock.fileno(), None)

    def _close_all(self) -> None:
        for fd, addresses in list(self._sockets.items()):
            try:
                probe = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)
            except OSError:
                continue
            with probe:
                same = _addresses(probe) == addresses
            if same:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._sockets.clear()


def _addresses(sock: Any) -> tuple:
    try:
        peer = sock.getpeername()
    except OSError:  # a listener
        peer = None
    return sock.getsockname(), peer


_INHERITED = _Inherited()


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, error: SwarmError) -> None:
    """Answer ``error``, then read what the caller had sent already (a refused call's tensors, a call
    after the handshake) until it closes, for at most ``LINGER_SECONDS``, before the connection is
    closed: a socket closed with unread bytes makes the kernel reset the connection, and a reset can
    overtake the answer. The caller closes its side on an error answer (``ChannelClient.call``)."""
    with contextlib.suppress(Exception):
        await _send(writer, runtime_pb2.ExpertResponse, "", error_reply(error), [])
        if writer.can_write_eof():  # not on TLS: its close_notify comes with the close
            writer.write_eof()
        await asyncio.wait_for(_drain(reader), LINGER_SECONDS)


async def _drain(reader: asyncio.StreamReader) -> None:
    while await reader.read(1 << 16):
        pass


def _close(writer: asyncio.StreamWriter) -> None:
    _INHERITED.discard(writer.get_extra_info("socket"))
    writer.close()


@contextlib.contextmanager
def _forgotten(writer: asyncio.StreamWriter):
    """Forget the connection's socket (``_INHERITED``) when it closes."""
    try:
        yield
    finally:
        _INHERITED.discard(writer.get_extra_info("socket"))


@dataclass
class _Ticket:
    peer_id: PeerId
    key: RSAPublicKey
    expires: float


@dataclass
class ChannelServer:
    """A peer's channel: a TCP listener (TLS 1.3 unless ``tls`` is off), the offers it hands out over
    libp2p (``rpc_open``) and the connections it serves through ``dispatch`` (the transport's
    admission and handlers). ``served`` counts calls served per method (tests check a tensor really
    went this way)."""

    identity: Identity
    host: str
    port: int = 0
    tls: bool = True
    announce: list[str] = field(default_factory=list)
    served: Counter = field(default_factory=Counter)
    host_of: Host | None = None
    _tickets: dict[str, _Ticket] = field(default_factory=dict)
    _server: asyncio.AbstractServer | None = None
    _context: ssl.SSLContext | None = None
    _fingerprint: str = ""
    _connections: set = field(default_factory=set)
    _per_caller: Counter = field(default_factory=Counter)

    async def start(self) -> None:
        if self.tls:
            cert, key = self_signed()
            self._context, self._fingerprint = server_context(cert, key), _fingerprint_of(cert)
        self._server = await asyncio.start_server(self._connection, self.host, self.port, ssl=self._context,
                                                  limit=_BUFFER)
        self.port = self._server.sockets[0].getsockname()[1]
        for sock in self._server.sockets:
            _INHERITED.add(sock)
        logger.info("data channel listening on %s:%d (%s)", self.host, self.port, "TLS 1.3" if self.tls else "plain TCP")

    async def close(self) -> None:
        if self._server is not None:
            for sock in self._server.sockets:
                _INHERITED.discard(sock)
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 3)
            self._server = None

    def offer(self, caller: PeerId | None, public_key: str) -> ChannelOffer:
        """A ticket for ``caller`` (authenticated by libp2p) holding ``public_key``, and where to use it."""
        if caller is None or self._server is None:
            raise PeerUnavailable("this node has no data channel open")
        try:
            key = RSAPublicKey.from_bytes(base64.b64decode(public_key, validate=True))
        except Exception as e:
            raise BadRequest(f"ChannelOpen: public_key is not a base64 RSA public key ({type(e).__name__})") from None
        now = time.monotonic()
        if len(self._tickets) >= MAX_TICKETS:
            for ticket in [t for t, held in self._tickets.items() if held.expires <= now][:MAX_TICKETS // 2] or \
                    list(self._tickets)[:MAX_TICKETS // 4]:
                del self._tickets[ticket]
        ticket = secrets.token_hex(32)
        self._tickets[ticket] = _Ticket(caller, key, now + TICKET_SECONDS)
        hosts = self.announce or [self.host]
        return ChannelOffer(hosts=hosts, port=self.port, tls=self.tls, fingerprint=self._fingerprint,
                            public_key=self.identity.public_key, ticket=ticket)

    def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _INHERITED.add(writer.get_extra_info("socket"))
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.closing(writer), _forgotten(writer):
            try:
                caller = await asyncio.wait_for(self._handshake(reader, writer), DIAL_SECONDS * 3)
            except (SwarmError, asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError) as e:
                logger.info("data channel handshake refused: %s: %s", type(e).__name__, e)
                if isinstance(e, SwarmError):
                    await _refuse(reader, writer, e)
                return
            if self._per_caller[caller] >= MAX_CONNECTIONS_PER_CALLER:
                logger.info("data channel: %s already has %d connections here", caller[-8:], self._per_caller[caller])
                await _refuse(reader, writer, CapacityExceeded(
                    f"this caller already has {MAX_CONNECTIONS_PER_CALLER} data channel connections here"))
                return
            self._per_caller[caller] += 1
            try:
                while await self._one_call(caller, reader, writer):
                    pass
            finally:
                self._per_caller[caller] -= 1
                if self._per_caller[caller] <= 0:
                    del self._per_caller[caller]

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> PeerId:
        server_nonce = secrets.token_bytes(_NONCE)
        writer.write(server_nonce)
        got = await read_header(reader, runtime_pb2.ExpertRequest, broken=AuthRejected, idle=DIAL_SECONDS)
        hello = got.message if got is not None and not got.layout else None
        if not (isinstance(hello, dict) and all(isinstance(hello.get(k), bytes) for k in ("nonce", "signature"))
                and isinstance(hello.get("ticket"), str) and isinstance(hello.get("peer_id"), str)):
            raise AuthRejected("the channel hello must be {ticket, peer_id, nonce, signature}")
        held = self._tickets.get(hello["ticket"])
        if held is None or held.expires <= time.monotonic():
            raise AuthRejected("unknown or expired channel ticket: ask for a new offer")
        if held.peer_id != hello["peer_id"]:
            raise AuthRejected(f"this ticket was issued to {held.peer_id[-8:]}, not to {hello['peer_id'][-8:]}")
        statement = _statement(self.identity.peer_id, held.peer_id, self._fingerprint, server_nonce,
                               hello["nonce"], "client")
        if not held.key.verify(statement, hello["signature"]):
            raise AuthRejected(f"the handshake of {held.peer_id[-8:]} is not signed by its record key")
        reply = _statement(self.identity.peer_id, held.peer_id, self._fingerprint, server_nonce, hello["nonce"],
                           "server")
        await _send(writer, runtime_pb2.ExpertResponse, "", {"signature": self.identity.key.sign(reply)}, [])
        return held.peer_id

    async def _one_call(self, caller: PeerId, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one call; False once the connection is done (closed, or out of step after a bad call:
        its unread bytes would be taken for the next header)."""
        assert self.host_of is not None, "a channel serves through its transport (P2PTransport.open_channel)"
        try:
            header = await read_header(reader, runtime_pb2.ExpertRequest, broken=BadRequest, idle=None)
            if header is None:
                return False
            served, ticket = self.host_of.admit(caller, header.uid)
            with ticket:
                tensors = await read_tensors(reader, header, limit=served.limit, broken=BadRequest,
                                             idle=IDLE_SECONDS, reserve=ticket.reserve)
                self.served[header.uid] += 1
                reply, out = await self.host_of.run(header.uid, served, caller, header.message, tensors)
            await _send(writer, runtime_pb2.ExpertResponse, "", reply, out)
            return True
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return False
        except SwarmError as e:
            logger.info("data channel call from %s refused: %s: %s", caller[-8:], type(e).__name__, e)
            await _refuse(reader, writer, e)
            return False
        except Exception:  # a bug, or memory for a tensor this host cannot hold: this connection, not the server
            logger.exception("data channel call from %s failed", caller[-8:])
            return False


@dataclass
class _Route:
    """What a client knows of one callee's channel."""

    offer: ChannelOffer | None = None
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)
    retry_at: float = 0.0


class ChannelClient:
    """The caller's side: per callee, an offer (asked over libp2p through ``ask``), a pool of
    authenticated connections, and when to try again after a refused dial. ``call`` returns None
    when no channel can be had now (the transport then uses libp2p); ``sent`` and ``fallbacks``
    count calls per method that went over the channel or fell back."""

    def __init__(self, identity: Identity, ask: Callable[[PeerId, ChannelOpen], Awaitable[Any]]):
        self.identity, self._ask = identity, ask
        self._routes: dict[PeerId, _Route] = {}
        self.sent: Counter = Counter()
        self.fallbacks: Counter = Counter()

    async def call(self, peer_id: PeerId, method: str, message: Any, tensors: Sequence[torch.Tensor], *,
                   max_reply_bytes: int | None) -> tuple[Any, list[torch.Tensor]] | None:
        connection = await self._connection(peer_id)
        if connection is None:
            self.fallbacks[method] += 1
            return None
        reader, writer = connection

        def broken(why: str) -> SwarmError:
            return PeerUnavailable(f"{method} on {peer_id[-8:]} (data channel): {why}")

        try:
            await _send(writer, runtime_pb2.ExpertRequest, method, message, tensors)
            header = await read_header(reader, runtime_pb2.ExpertResponse, broken=broken, idle=None)
            if header is None:
                raise broken("the connection closed before the reply")
            out = await read_tensors(reader, header, limit=max_reply_bytes, broken=broken, idle=IDLE_SECONDS)
        except BaseException:
            _close(writer)
            raise
        self.sent[method] += 1
        if isinstance(header.message, dict) and "error" in header.message:
            # the callee closes a connection after refusing a call on it (``_refuse``): back in the pool,
            # the next call found it closed ("the connection closed before the reply": a revoked
            # trainer presenting its token again was taken for a broken peer and rerouted until no
            # route was left, tests/integration/test_keys_auth.py, about one run in three)
            _close(writer)
        else:
            self._release(peer_id, reader, writer)
        return header.message, out

    def _release(self, peer_id: PeerId, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        route = self._routes.get(peer_id)
        if route is not None and len(route.idle) < IDLE_PER_PEER and not writer.is_closing():
            route.idle.append((reader, writer))
        else:
            _close(writer)

    async def _connection(self, peer_id: PeerId) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        route = self._routes.setdefault(peer_id, _Route())
        while route.idle:
            reader, writer = route.idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
        if time.monotonic() < route.retry_at:
            return None
        for attempt in range(2):  # a stale offer (the callee restarted, its ticket expired): ask once more
            fresh = route.offer is None
            if fresh:
                try:
                    route.offer = await self._ask(peer_id, ChannelOpen(public_key=self.identity.public_key))
                except AuthRejected:  # a keyed run's caller that has not presented its token yet: ask again later
                    return None
                except SwarmError as e:
                    logger.debug("no data channel to %s: %s", peer_id[-8:], e)
                    break
            try:
                return await self._dial(peer_id, route.offer)
            except (OSError, asyncio.TimeoutError, SwarmError, asyncio.IncompleteReadError, ssl.SSLError) as e:
                logger.info("cannot use the data channel of %s (attempt %d, %s: %s)%s", peer_id[-8:], attempt + 1,
                            type(e).__name__, e, "" if fresh else ": asking for a new offer")
                route.offer = None
                if fresh:
                    break
        route.retry_at = time.monotonic() + RETRY_SECONDS
        return None

    async def _dial(self, peer_id: PeerId, offer: ChannelOffer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the first of the offered hosts that answers and passes the handshake (another
        machine at an address of the list, e.g. a loopback one, fails the pinned fingerprint or the
        signature); the last failure if none does."""
        error: Exception = PeerUnavailable("no address offered")
        for host in offer.hosts:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    host, offer.port, ssl=client_context() if offer.tls else None, limit=_BUFFER), DIAL_SECONDS)
            except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
                error = e
                continue
            _INHERITED.add(writer.get_extra_info("socket"))
            try:
                await asyncio.wait_for(self._handshake(peer_id, offer, reader, writer), DIAL_SECONDS * 3)
            except (OSError, asyncio.TimeoutError, SwarmError, asyncio.IncompleteReadError, ssl.SSLError) as e:
                _close(writer)
                error = e
                continue
            except BaseException:
                _close(writer)
                raise
            return reader, writer
        raise error

    async def _handshake(self, peer_id: PeerId, offer: ChannelOffer, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        if offer.tls:
            cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            if hashlib.sha256(cert).hexdigest() != offer.fingerprint:
                raise AuthRejected(f"the data channel of {peer_id[-8:]} shows another certificate than offered")
        server_nonce = await asyncio.wait_for(reader.readexactly(_NONCE), DIAL_SECONDS)
        nonce = secrets.token_bytes(_NONCE)
        me = self.identity.peer_id
        signature = self.identity.key.sign(_statement(peer_id, me, offer.fingerprint, server_nonce, nonce, "client"))
        await _send(writer, runtime_pb2.ExpertRequest, "",
                    {"ticket": offer.ticket, "peer_id": me, "nonce": nonce, "signature": signature}, [])
        got = await read_header(reader, runtime_pb2.ExpertResponse, broken=AuthRejected, idle=DIAL_SECONDS)
        answer = got.message if got is not None and not got.layout else None
        if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
            raise AuthRejected(str(answer["error"].get("message")))
        key = RSAPublicKey.from_bytes(base64.b64decode(offer.public_key))
        statement = _statement(peer_id, me, offer.fingerprint, server_nonce, nonce, "server")
        if not (isinstance(answer, dict) and isinstance(answer.get("signature"), bytes)
                and key.verify(statement, answer["signature"])):
            raise AuthRejected(f"the data channel of {peer_id[-8:]} did not sign the handshake with its record key")

    async def close(self) -> None:
        for route in self._routes.values():
            for _, writer in route.idle:
                _close(writer)
            route.idle.clear()


def channel_hosts(announce: str | None, listen: str, maddrs: Sequence[str]) -> list[str]:
    """Where callers dial a channel listening on ``listen``: the announced host; else the listen host
    unless it is a wildcard; else the IPv4 hosts the p2p node is seen at (its visible multiaddrs),
    loopback last (a caller on another machine dials the others first)."""
    if announce:
        return [announce]
    if listen not in ("0.0.0.0", "::", ""):
        return [listen]
    seen = [address.split("/")[2] for address in maddrs if address.startswith("/ip4/")]
    hosts = sorted(dict.fromkeys(host for host in seen if host != "0.0.0.0"), key=lambda host: host.startswith("127."))
    return hosts[:8] or ["127.0.0.1"]
