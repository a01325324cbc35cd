"""How a call reaches a peer: a small interface, the real hivemind P2P transport, and a fake.

Logic that sends work to peers (the trainer's pipeline, tests of it) takes a ``Transport``; the
in-memory fake lets a whole pipeline run inside one event loop in a unit test, and the P2P transport
carries the same (message, tensors) pairs over libp2p streams between processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import Counter
from contextvars import ContextVar
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Protocol, Sequence, TypeVar

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming
from multiaddr import Multiaddr

from net.admission import PUBLIC_REQUEST_BYTES, REFUSED_DISCARD_BYTES, CallerLimits, Gate, Refusals, Ticket
from net.channel import OPEN, ChannelClient, ChannelOffer, ChannelOpen, ChannelServer, Identity, Served
from net.framing import IDLE_SECONDS, envelope, raw_bytes, read_frames, write_frames
from net.rpc import Outgoing, error_reply, ok_reply, parse_reply, parse_request, wire_form
from core.loop import bounded
from core.errors import AuthRejected, BadRequest, CapacityExceeded, PeerUnavailable, StageTimeout, SwarmError
from core.types import PeerId

__all__ = ["Handler", "Transport", "P2PTransport", "InMemoryTransport", "MAX_REQUEST_BYTES", "CALLER"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

Handler = Callable[[Any, list[torch.Tensor]], Awaitable[tuple[dict, list[torch.Tensor]]]]

_OFFER_SECONDS = 10.0
CHUNK_BYTES = 1 << 20
FRAME_BYTES = 4 << 20
MAX_REQUEST_BYTES = 1 << 30

# the libp2p peer id of the caller of the request being handled (authenticated by libp2p's secure
# channel); None in the in-memory transport. Keyed runs check it against the caller's access token.
CALLER: ContextVar[str | None] = ContextVar("swarm_caller", default=None)


class Transport(Protocol):
    """Send ``(message, tensors)`` to a peer's ``method`` and get ``(reply, tensors)`` back. A call
    sends a ``Message`` (``net.rpc``; a ``Raw`` payload only where no message allows it); a handler
    gets the decoded payload and parses it (``net.rpc.parsing``)."""

    async def call(
        self, peer_id: PeerId, method: str, message: Outgoing, tensors: Sequence[torch.Tensor], *, timeout: float,
        max_reply_bytes: int | None = MAX_REQUEST_BYTES,
    ) -> tuple[Any, list[torch.Tensor]]: ...

    async def serve(self, method: str, handler: Handler, *, max_request_bytes: int | None = MAX_REQUEST_BYTES,
                    public: bool = False) -> None: ...


class P2PTransport:
    """Calls and handlers over hivemind's P2P (libp2p streams through the p2pd daemon).

    One call is one stream: the first frame carries the msgpack message, every frame may carry a
    chunk of a serialized tensor, so activations of any size travel without a message-size limit.
    Frames are hivemind's protobuf stream frames, read by ``net.framing`` so that a frame or a
    request announcing more than its limit is refused before its bytes are read.

    Every served stream passes ``net.admission`` first: the caller's open streams and bytes in
    flight are capped (``limits``), and with a ``gate`` (a keyed run) a caller without a valid token
    is answered ``AuthRejected`` before its request is read, on every method not served ``public``
    (held a while first for a caller refused again and again: ``refusals``).

    With a data channel (``net.channel``), calls go over a direct TCP connection to each callee that
    offers one and can be dialled (``use_channel``), and this node serves its handlers on its own
    (``open_channel``), behind the same admission; libp2p stays the control plane (the offers) and the
    fallback.

    ``addresses`` (peer id -> relayed addresses, ``SwarmDHT.relayed``): a peer behind NAT is dialed
    through its relay before every call to it (about 1 ms when a connection is up: the daemon
    answers at once), since the daemon cannot find those addresses itself and a relayed connection
    can be gone by the next call (a reset relay, a replaced one): the daemon would otherwise dial the
    peer's private address and fail.
    """

    def __init__(self, p2p: P2P, *, gate: Gate | None = None, limits: CallerLimits | None = None,
                 refusals: Refusals | None = None, addresses: Mapping[str, list[str]] | None = None):
        self.p2p = p2p
        self.addresses = addresses
        self.gate = gate
        self.limits = limits or CallerLimits()
        self.refusals = refusals or Refusals()
        self._served: list[str] = []
        self._methods: dict[str, Served] = {}
        self.public: set[str] = set()
        self.channel: ChannelClient | None = None
        self.channel_server: ChannelServer | None = None
        # whether this node's p2p side (DHT, daemon) still lives: a channel call to a node whose daemon
        # died is refused as a libp2p call to it would be (its process still serves the socket)
        self.alive: Callable[[], bool] | None = None

    async def serve(self, method: str, handler: Handler, *, max_request_bytes: int | None = MAX_REQUEST_BYTES,
                    public: bool = False) -> None:
        """``max_request_bytes=None`` lifts the size ceiling (a checkpoint of any size). ``public``
        methods are open to callers without a token (at most ``PUBLIC_REQUEST_BYTES`` each)."""
        limit = min(max_request_bytes or PUBLIC_REQUEST_BYTES, PUBLIC_REQUEST_BYTES) if public else max_request_bytes

        async def _stream_handler(info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            caller = info.peer_id.to_base58()
            with contextlib.closing(writer):
                CALLER.set(caller)
                try:
                    ticket = self.limits.open(caller, limit)
                except CapacityExceeded as e:  # too many streams: not a byte more is read
                    await _send(writer, reader, method, (error_reply(e), [], False))
                    return
                with ticket:
                    try:
                        self._check_gate(caller, public)
                    except AuthRejected as e:
                        if hold := self.refusals.hold(caller, time.monotonic()):
                            await asyncio.sleep(hold)  # unread: what it sends meanwhile waits in flow control
                        await _send(writer, reader, method, (error_reply(e), [], True), discard=REFUSED_DISCARD_BYTES)
                        return
                    answer = await _answer(method, handler, reader, limit, ticket.reserve)
                    if answer is not None:  # None: the caller left before the reply
                        await _send(writer, reader, method, answer)

        await self.p2p.add_binary_stream_handler(method, _stream_handler)
        self._served.append(method)
        self._methods[method] = Served(handler, limit, public)
        if public:
            self.public.add(method)

    def _check_gate(self, caller: PeerId, public: bool) -> None:
        if self.gate is not None and not public:
            self.gate.check(caller)

    def use_channel(self, identity: Identity) -> None:
        """Call peers over their data channels where they offer one and can be dialled (``identity``:
        this node's peer id and DHT record key, which sign its side of each handshake)."""
        self.channel = ChannelClient(identity, self._ask_offer)

    async def open_channel(self, server: ChannelServer) -> None:
        """Serve this transport's handlers on ``server`` too, and offer it to callers (``OPEN``)."""
        server.host_of = self
        await server.start()
        self.channel_server = server
        await self.serve(OPEN, self._rpc_open, max_request_bytes=PUBLIC_REQUEST_BYTES)

    async def _rpc_open(self, message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        try:
            request = parse_request(ChannelOpen, message)
            return ok_reply(self.channel_server.offer(CALLER.get(), request.public_key)), []
        except SwarmError as e:
            return error_reply(e), []

    async def _ask_offer(self, peer_id: PeerId, request: ChannelOpen) -> ChannelOffer:
        reply, _ = await self.call(peer_id, OPEN, request, [], timeout=_OFFER_SECONDS)
        return parse_reply(ChannelOffer, reply)

    def admit(self, caller: PeerId, method: str) -> tuple[Served, Ticket]:
        """A channel call's admission, as a stream's: the method, the caller's limits, the gate."""
        served = self._methods.get(method)
        if served is None:
            raise BadRequest(f"this node does not serve {method[:100]!r}")
        if self.alive is not None and not self.alive():
            raise PeerUnavailable("this peer's DHT and p2p daemon are gone: it cannot take part in the run")
        ticket = self.limits.open(caller, served.limit)
        try:
            self._check_gate(caller, served.public)
        except AuthRejected:
            ticket.close()
            raise
        return served, ticket

    async def run(self, method: str, served: Served, caller: PeerId, message: Any,
                  tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        """A channel call's handler run as a stream's, every failure a named error reply."""
        CALLER.set(caller)
        try:
            return await served.handler(message, tensors)
        except SwarmError as e:
            return error_reply(e), []
        except asyncio.CancelledError:
            if _cancelling():
                raise
            logger.warning("%s: the work was cancelled on this peer", method, exc_info=True)
            return error_reply(SwarmError(f"{method}: the work was cancelled on this peer")), []
        except Exception as e:  # a bug: one failed request, a named error for the caller, a trace here
            logger.exception("%s failed", method)
            return error_reply(SwarmError(f"internal error in {method}: {type(e).__name__}: {e}")), []

    @property
    def served(self) -> list[str]:
        """The methods this transport serves (the census test checks each)."""
        return list(self._served)

    async def call(
        self, peer_id: PeerId, method: str, message: Outgoing, tensors: Sequence[torch.Tensor], *, timeout: float,
        max_reply_bytes: int | None = MAX_REQUEST_BYTES,
    ) -> tuple[Any, list[torch.Tensor]]:
        async def _roundtrip() -> tuple[Any, list[torch.Tensor]]:
            relayed = await self._dial_relayed(peer_id)
            if self.channel is not None and method != OPEN and not relayed:  # behind NAT: nobody dials its channel
                got = await self.channel.call(peer_id, method, wire_form(message), tensors,
                                              max_reply_bytes=max_reply_bytes)
                if got is not None:
                    return got
            _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), method)
            def broken(why: str) -> SwarmError:  # a reply cut short or refused: the peer, not the request
                return PeerUnavailable(f"{method} on {peer_id[-8:]}: {why}")

            with contextlib.closing(writer):
                sending = asyncio.create_task(
                    write_frames(writer, _frames(wire_form(message), tensors, runtime_pb2.ExpertRequest), end=True))
                sending.add_done_callback(_retrieve)
                try:
                    replies = read_frames(reader, runtime_pb2.ExpertResponse, max_total=max_reply_bytes,
                                          refused=broken, broken=broken)
                    return await _receive(replies, broken, max_reply_bytes, until_whole=True)
                finally:
                    sending.cancel()

        try:
            async with asyncio.timeout(timeout):  # not wait_for: no task of its own per call
                return await _roundtrip()
        except TimeoutError:
            raise StageTimeout(f"{method} on {peer_id[-8:]} took longer than {timeout:.0f} s") from None
        except SwarmError:
            raise
        except Exception as e:  # P2PDaemonError, P2PHandlerError, ConnectionError, ...: the peer is gone
            raise PeerUnavailable(f"{method} on {peer_id[-8:]} failed: {type(e).__name__}: {e}") from None

    async def _dial_relayed(self, peer_id: PeerId) -> bool:
        """Connect to ``peer_id`` through its relay if it is behind NAT; whether it is."""
        relayed = self.addresses.get(peer_id) if self.addresses is not None else None
        if not relayed:
            return False
        try:
            await self.p2p._client.connect(PeerID.from_base58(peer_id), [Multiaddr(a) for a in relayed])
        except Exception as e:  # ControlFailure: the relay is gone or holds no slot for it
            raise PeerUnavailable(f"{peer_id[-8:]} is not reachable through its relay: {type(e).__name__}: "
                                  f"{str(e)[:300]}") from None
        return True

    async def reach(self, peer_ids: Sequence[PeerId]) -> list[str]:
        """Make sure this node's daemon holds a connection to each of ``peer_ids`` that sits behind
        NAT, through its relay, for others that share the daemon and dial by peer id alone
        (hivemind's averager); returns why each one that could not be reached was not."""
        failed = []
        for peer_id in peer_ids:
            try:
                await self._dial_relayed(peer_id)
            except PeerUnavailable as e:
                failed.append(str(e))
        return failed

    async def close(self) -> None:
        """Stop serving and close this transport's P2P connection, each bounded (``bounded``): a
        daemon already gone, or one that hangs, never holds up the stop of whatever owns this."""
        await bounded(self.shutdown(), 3, "removing the RPC handlers")
        await bounded(self.p2p.shutdown(), 3, "the P2P connection")

    async def shutdown(self) -> None:
        """Stop serving: the data channel's listener and connections, the RPC handlers."""
        if self.channel is not None:
            await self.channel.close()
        if self.channel_server is not None:
            await self.channel_server.close()
            self.channel_server = None
        for method in self._served:
            try:
                await self.p2p.remove_protobuf_handler(method, stream_input=True, stream_output=True)
            except Exception as e:  # the daemon may already be gone at shutdown; nothing to undo then
                logger.debug("removing handler %s: %s", method, e)
        self._served.clear()
        self._methods.clear()


class InMemoryTransport:
    """A fake transport for unit tests: handlers of several 'peers' called directly in one loop.

    Messages go through msgpack and tensors are copied, as on the wire, so a handler cannot touch the
    caller's autograd graph. Faults: ``fail[peer_id] = exception`` makes that peer's calls raise it
    before they reach the handler; ``lose_replies[(peer_id, method)] = n`` runs the next ``n`` such
    calls and then loses their replies (the caller sees ``PeerUnavailable``), as a broken connection would.
    ``tensor_bytes[method]`` counts the bytes of tensor data that calls of ``method`` sent and got back.
    """

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, str], Handler] = {}
        self.fail: dict[str, Exception] = {}
        self.lose_replies: dict[tuple[str, str], int] = {}
        self.tensor_bytes: Counter[str] = Counter()

    def bind(self, peer_id: PeerId) -> "_BoundInMemory":
        return _BoundInMemory(self, peer_id)

    async def call(
        self, peer_id: PeerId, method: str, message: Outgoing, tensors: Sequence[torch.Tensor], *, timeout: float,
        max_reply_bytes: int | None = MAX_REQUEST_BYTES, caller: PeerId | None = None,
    ) -> tuple[Any, list[torch.Tensor]]:
        """``caller``: the handler's ``CALLER`` (a bound peer's calls name it; the hub's own: None)."""
        if peer_id in self.fail:
            raise self.fail[peer_id]
        handler = self._handlers.get((peer_id, method))
        if handler is None:
            raise PeerUnavailable(f"no peer {peer_id} serving {method}")
        decoded = msgpack.unpackb(msgpack.packb(wire_form(message)))
        context = contextvars.copy_context()  # the handler sees the caller, the calling task does not
        context.run(CALLER.set, caller)
        work = asyncio.create_task(handler(decoded, [t.detach().clone() for t in tensors]), context=context)
        try:
            reply, out = await asyncio.wait_for(work, timeout)
        except asyncio.TimeoutError:
            raise StageTimeout(f"{method} on {peer_id} took longer than {timeout} s") from None
        except SwarmError as e:
            reply, out = error_reply(e), []
        if self.lose_replies.get((peer_id, method), 0) > 0:
            self.lose_replies[(peer_id, method)] -= 1
            raise PeerUnavailable(f"{method} on {peer_id}: the stream closed without a reply")
        self.tensor_bytes[method] += sum(t.numel() * t.element_size() for t in (*tensors, *out))
        return msgpack.unpackb(msgpack.packb(reply)), [t.detach().clone() for t in out]


class _BoundInMemory:
    """The serving side of one fake peer."""

    def __init__(self, hub: InMemoryTransport, peer_id: PeerId):
        self._hub, self.peer_id = hub, peer_id

    async def serve(self, method: str, handler: Handler, *, max_request_bytes: int | None = MAX_REQUEST_BYTES,
                    public: bool = False) -> None:
        self._hub._handlers[(self.peer_id, method)] = handler

    async def call(self, *args, **kwargs):
        return await self._hub.call(*args, caller=self.peer_id, **kwargs)


def _frames(message: Any, tensors: Sequence[torch.Tensor], frame_type: type) -> list:
    """The envelope ``[message, number of tensors]`` in the first frame, then the tensors as
    serialized chunks (the first chunk of each says how many it has), packed into as few frames of
    at most ``FRAME_BYTES`` as they fit in: a typical activation travels with its envelope in one
    frame, which leaves a stream no moment at which it holds half a reply.

    The chunks are hivemind's uncompressed tensor format (``runtime_pb2.Tensor``, as
    ``serialize_torch_tensor`` + ``split_for_streaming`` make it), built straight from the tensor's
    memory: each byte is copied once into its frame (hivemind's path copies it four times)."""
    frames = [frame_type(metadata=msgpack.packb([message, len(tensors)]))]
    size = 0
    for tensor in tensors:
        data, dtype = raw_bytes(tensor)
        count = max(1, -(-len(data) // CHUNK_BYTES))
        for index in range(count):
            piece = data[index * CHUNK_BYTES:(index + 1) * CHUNK_BYTES]
            if size + len(piece) > FRAME_BYTES and size > 0:
                frames.append(frame_type())
                size = 0
            if index == 0:
                frames[-1].tensors.add(buffer=piece.tobytes(), size=tensor.shape, dtype=dtype, chunks=count,
                                       compression=runtime_pb2.CompressionType.NONE)
            else:
                frames[-1].tensors.add(buffer=piece.tobytes())
            size += len(piece)
    return frames


async def _answer(method: str, handler: Handler, reader: asyncio.StreamReader, limit: int | None,
                  reserve: Callable[[int], None] | None = None) -> tuple[dict, list[torch.Tensor], bool] | None:
    """Read one request (refused before it is read if it is too large), run the handler, and return
    its reply and whether part of the request was left unread; every failure is a named error reply.
    None: the caller left, its work was cancelled."""
    ended: list[bool] = []
    try:
        requests = read_frames(reader, runtime_pb2.ExpertRequest, max_total=limit, refused=BadRequest,
                               broken=BadRequest, idle=IDLE_SECONDS, on_end=lambda: ended.append(True),
                               reserve=reserve)
        message, tensors = await _receive(requests, BadRequest, limit)
        result = await _unless_caller_leaves(handler(message, tensors), reader)
        return None if result is None else (*result, False)
    except SwarmError as e:
        return error_reply(e), [], not ended
    except asyncio.CancelledError:
        if _cancelling():  # the stream itself is going away (the node stops)
            raise
        # something the handler waited on was cancelled under it (e.g. a future in another
        # process): without a reply the caller would see a stream closed for no reason
        logger.warning("%s: the work was cancelled on this peer", method, exc_info=True)
        return error_reply(SwarmError(f"{method}: the work was cancelled on this peer")), [], False
    except Exception as e:  # a bug: one failed request, a named error for the caller, a trace here
        logger.exception("%s failed", method)
        return error_reply(SwarmError(f"internal error in {method}: {type(e).__name__}: {e}")), [], not ended


async def _send(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, method: str,
                answer: tuple[dict, list[torch.Tensor], bool], *, discard: int = 64 << 20) -> None:
    """Write the reply; if part of the request was left unread, read and drop at most ``discard``
    bytes of it first-come (closing with unread input resets the stream and loses the reply)."""
    reply, out, unread = answer
    try:
        await write_frames(writer, _frames(reply, out, runtime_pb2.ExpertResponse), end=False)
        if unread:
            await _discard(reader, limit=discard)
    except Exception as e:  # the caller closed its end: nobody is left to tell
        logger.debug("%s: the reply could not be sent: %s", method, e)


async def _unless_caller_leaves(work: Awaitable[T], reader: asyncio.StreamReader) -> T | None:
    """``work``'s result, or None once the caller closes its end first (the work is cancelled then):
    after its end-of-stream mark a caller sends nothing more until it has read the reply."""
    task = asyncio.ensure_future(work)
    closed = asyncio.ensure_future(reader.read(1))
    try:
        await asyncio.wait({task, closed}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        closed.cancel()
    if not task.done():
        task.cancel()
        return None
    return task.result()


async def _discard(reader: asyncio.StreamReader, seconds: float = 2.0, limit: int = 64 << 20) -> None:
    """Read and drop what the caller still sends (at most ``limit`` bytes for ``seconds``) until it
    closes its end, which it does once it has the reply."""
    dropped = 0
    with contextlib.suppress(asyncio.TimeoutError):
        async with asyncio.timeout(seconds):
            while dropped < limit and (chunk := await reader.read(1 << 16)):
                dropped += len(chunk)


def _retrieve(task: asyncio.Task) -> None:
    """Mark a background send's failure as seen: the reply (or its absence) tells the caller."""
    if not task.cancelled():
        task.exception()


def _cancelling() -> bool:
    """Whether the running task has been asked to stop (as opposed to a CancelledError raised by
    something it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _receive(
    frames: AsyncIterator, broken: Callable[[str], SwarmError], limit: int | None = MAX_REQUEST_BYTES, *,
    until_whole: bool = False,
) -> tuple[Any, list[torch.Tensor]]:
    """Reassemble (message, tensors) from a stream of frames. Undecodable input is a ``BadRequest``;
    a stream that ends before everything the envelope announced has arrived raises ``broken(why)``
    (the connection closed early: a ``PeerUnavailable`` for a caller, who may retry). More than
    ``limit`` bytes of tensors (None: no limit) is a ``BadRequest``. ``until_whole`` stops reading as
    soon as everything announced has arrived (a reply: the handler may still be draining a request it
    refused, and only closes its end after that)."""
    metadata: bytes | None = None
    groups: list[list[runtime_pb2.Tensor]] = []
    received = 0
    announced: int | None = None  # tensors the envelope announces (read once, for ``until_whole``)
    async for frame in frames:
        if metadata is None:
            metadata = frame.metadata
            announced = _announced(metadata) if until_whole else None
        for part in frame.tensors:
            received += len(part.buffer)
            if limit is not None and received > limit:
                raise BadRequest(f"request larger than {limit >> 20} MiB")
            if part.dtype or not groups:  # the first chunk of a tensor names its dtype
                groups.append([])
            groups[-1].append(part)
        if announced is not None and len(groups) == announced and all(map(_arrived, groups)):
            break
    if metadata is None:
        raise broken("the stream closed before its first frame")
    message, expected = envelope(metadata)
    complete = [group for group in groups if _arrived(group)]
    if len(groups) != expected or len(complete) != expected:
        raise broken(f"the stream closed early: {len(complete)} of {expected} tensor(s) arrived whole")
    return message, [_deserialize(group, i) for i, group in enumerate(groups)]


def _arrived(chunks: list[runtime_pb2.Tensor]) -> bool:
    """Whether a tensor's chunks are all there (its first chunk says how many it has)."""
    return len(chunks) >= max(1, chunks[0].chunks)


def _announced(metadata: bytes) -> int | None:
    """How many tensors the envelope announces (None if it is unreadable: reading on to the end then
    reports it)."""
    try:
        return envelope(metadata)[1]
    except BadRequest:
        return None


def _deserialize(parts: list[runtime_pb2.Tensor], index: int) -> torch.Tensor:
    try:
        if parts[0].compression != runtime_pb2.CompressionType.NONE:  # not what _frames sends: hivemind's codecs
            return deserialize_torch_tensor(combine_from_streaming(parts))
        return _from_chunks(parts)
    except Exception as e:  # a buffer that does not match its declared size or dtype
        raise BadRequest(f"tensor #{index} cannot be decoded: {type(e).__name__}: {e}") from None


def _from_chunks(parts: list[runtime_pb2.Tensor]) -> torch.Tensor:
    """An uncompressed tensor from its chunks, each byte copied once: into the tensor's own memory."""
    first = parts[0]
    dtype = getattr(torch, first.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {first.dtype!r}")
    shape = torch.Size(first.size)
    size = sum(len(part.buffer) for part in parts)
    expected = shape.numel() * torch.empty((), dtype=dtype).element_size()
    if size != expected:
        raise ValueError(f"{size} bytes for a {first.dtype} tensor of shape {list(shape)} ({expected} bytes)")
    out = torch.empty(size, dtype=torch.uint8)
    view, offset = memoryview(out.numpy()), 0
    for part in parts:
        view[offset:offset + len(part.buffer)] = part.buffer
        offset += len(part.buffer)
    return out.view(dtype).reshape(shape)

