"""hivemind's stream wire format, read with limits: a frame's declared size is checked before it is read.

hivemind's protobuf stream handlers read each frame as ``marker (1 byte) + length (8 bytes, big endian)
+ protobuf`` and then ``readexactly(length)``: a caller declaring a frame of 100 GiB makes the peer
buffer whatever it sends until it runs out of memory. ``read_frames`` speaks the same format (so
hivemind's own callers and handlers interoperate unchanged) but refuses a frame larger than
``max_frame`` and a stream whose frames add up to more than ``max_total`` *from their headers*, before
reading their bodies. ``write_frames`` writes the same format.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Iterable

import msgpack
import torch

from google.protobuf.message import DecodeError
from hivemind.p2p import P2P
from hivemind.proto.p2pd_pb2 import RPCError

from core.errors import BadRequest, SwarmError

__all__ = ["MAX_FRAME_BYTES", "IDLE_SECONDS", "read_frames", "read_frame", "read_exactly", "write_frames", "envelope", "raw_bytes"]

# our frames carry at most FRAME_BYTES (4 MiB) of tensor chunks plus the envelope; 16 MiB leaves room
# for a big envelope (a page of ledger entries) and refuses anything that is not one of ours
MAX_FRAME_BYTES = 16 << 20

# a handler gives up on a request whose next frame has not arrived after this long
IDLE_SECONDS = 60.0

_HEADER = P2P.HEADER_LEN


async def read_frames(
    reader: asyncio.StreamReader, frame_type: type, *, max_total: int | None, refused: Callable[[str], SwarmError],
    broken: Callable[[str], SwarmError], max_frame: int = MAX_FRAME_BYTES, idle: float | None = None,
    on_end: Callable[[], object] | None = None, reserve: Callable[[int], None] | None = None,
) -> AsyncIterator:
    """Yield the frames of one direction of a stream until its end-of-stream mark or its close.

    A frame or a total over the limits raises ``refused(why)`` before its body is read; a frame that
    is not a ``frame_type`` protobuf is a ``BadRequest``; an error frame from the other side (not
    the end-of-stream mark) raises ``broken(its message)``. A close, even mid-frame, just ends the
    frames: the reader of the frames checks that everything announced arrived. A header or a frame
    that takes longer than ``idle`` s to arrive raises ``refused`` (a caller that stalls half-way
    does not hold the stream for ever). ``on_end()`` is called when the frames end normally (the
    end-of-stream mark or a close), so a reader that stopped early can tell. ``reserve(length)`` is
    called with each frame's announced length before its body is read, and may raise to refuse it
    (the caller's byte budget, ``net.admission``)."""
    total = 0

    def admit(length: int) -> None:
        nonlocal total
        total += length
        if max_total is not None and total > max_total:
            raise refused(f"request larger than {max_total >> 20} MiB")
        if reserve is not None:
            reserve(length)

    while (frame := await read_frame(reader, frame_type, refused=refused, broken=broken, max_frame=max_frame,
                                     idle=idle, admit=admit)) is not None:
        yield frame
    _ended(on_end)


async def read_frame(reader: asyncio.StreamReader, frame_type: type, *, refused: Callable[[str], SwarmError],
                     broken: Callable[[str], SwarmError], max_frame: int = MAX_FRAME_BYTES, idle: float | None = None,
                     admit: Callable[[int], None] | None = None) -> Any | None:
    """The next frame (``read_frames``' checks, ``admit(length)`` before its body is read), or None
    at the end of the stream (its end-of-stream mark or a close, even mid-frame). One frame without
    an async generator around it: a data channel call reads exactly one header."""
    try:
        header = await read_exactly(reader, 1 + _HEADER, idle, refused)
    except asyncio.IncompleteReadError:
        return None
    marker, length = header[:1], int.from_bytes(header[1:], P2P.BYTEORDER)
    if length > max_frame:
        raise refused(f"a frame of {length} bytes was announced; frames are at most {max_frame >> 20} MiB")
    if admit is not None:
        admit(length)
    try:
        body = await read_exactly(reader, length, idle, refused)
    except asyncio.IncompleteReadError:
        return None
    if marker == P2P.ERROR_MARKER:
        error = _parse(RPCError, body)
        if not error.message:  # hivemind's END_OF_STREAM: the other side sent everything
            return None
        raise broken(f"the other side failed: {error.message[:300]}")
    if marker != P2P.MESSAGE_MARKER:
        raise BadRequest(f"invalid frame marker {marker!r}")
    return _parse(frame_type, body)


def _ended(on_end: Callable[[], object] | None) -> None:
    if on_end is not None:
        on_end()


async def read_exactly(reader: asyncio.StreamReader, size: int, idle: float | None,
                       stalled: Callable[[str], SwarmError]) -> bytes:
    """``size`` bytes, or ``stalled(why)`` if they take longer than ``idle`` s (None: no limit); a
    close before them is ``asyncio.IncompleteReadError``. ``asyncio.timeout``, not ``wait_for``:
    ``wait_for`` makes a task per read, a fifth of a 1-token hop's own cost (``hop_latency.py``)."""
    if idle is None:
        return await reader.readexactly(size)
    try:
        async with asyncio.timeout(idle):
            return await reader.readexactly(size)
    except TimeoutError:
        raise stalled(f"the stream stalled: {size} byte(s) did not arrive within {idle:.0f} s") from None


def _parse(frame_type: type, body: bytes):
    frame = frame_type()
    try:
        frame.ParseFromString(body)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise BadRequest(f"a frame is not a valid {frame_type.__name__} ({type(e).__name__})") from None
    return frame


async def write_frames(writer: asyncio.StreamWriter, frames: Iterable, *, end: bool) -> None:
    """Send ``frames``, then (``end``) the end-of-stream mark a handler waits for."""
    for frame in frames:
        await P2P.send_protobuf(frame, writer)
    if end:
        await P2P.send_protobuf(P2P.END_OF_STREAM, writer)


def envelope(metadata: bytes) -> tuple[Any, int]:
    """A first frame's ``[message, number of tensors]``; anything else is a ``BadRequest``."""
    try:
        decoded = msgpack.unpackb(metadata)
    except Exception as e:  # msgpack raises ExtraData, FormatError, StackError, ValueError ...
        raise BadRequest(f"the message is not valid msgpack ({type(e).__name__})") from None
    if not (isinstance(decoded, list) and len(decoded) == 2 and isinstance(decoded[1], int)):
        raise BadRequest("the first frame must be [message, number of tensors]")
    return decoded[0], decoded[1]


def raw_bytes(tensor: torch.Tensor) -> tuple[memoryview, str]:
    """The bytes of ``tensor`` without copying them (a contiguous CPU tensor), and its dtype name."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    name = str(tensor.dtype).replace("torch.", "")
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor  # numpy has no bfloat16
    if raw.numel() == 0:
        return memoryview(b""), name
    return memoryview(raw.numpy()).cast("B"), name
