"""Hypothesis strategies for fuzzing the RPC handlers, and the checks every reply must pass.

A fuzzed request is a valid template of the method's message with some fields dropped, replaced by
values of the wrong kind (huge numbers, nested maps, wrong versions) or joined by unknown ones, or no
map at all; its tensors have random dtypes, shapes (including the stage's hidden width) and values
(NaN, inf, huge). Raw requests are random bytes, envelopes whose tensor parts declare sizes, dtypes and
chunk counts that do not match their buffers, and frames whose header announces more than is sent.
``SWARM_FUZZ_EXAMPLES`` (default 25) sets the examples per handler: raise it to fuzz longer.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import msgpack
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from core.messages import PROTOCOL_VERSION
from net.framing import read_frames
from core.errors import BadRequest, error_from_wire

__all__ = ["FUZZ_SETTINGS", "RAW_FUZZ_SETTINGS", "messages", "tensor_lists", "raw_requests", "raw_channel_requests",
           "check_reply", "template_for", "read_reply"]

FUZZ_EXAMPLES = int(os.environ.get("SWARM_FUZZ_EXAMPLES", "25"))
_LONG = bool(os.environ.get("SWARM_FUZZ_EXAMPLES"))
FUZZ_SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=not _LONG,
                         suppress_health_check=list(HealthCheck), database=None)
# raw streams exercise the one transport every handler shares: fewer examples per handler
RAW_FUZZ_SETTINGS = settings(FUZZ_SETTINGS, max_examples=max(FUZZ_EXAMPLES // 4, 5))

_LAYERS = {"start": 0, "end": 1}
_SESSION = "fuzz-session"
_META = {"run_id": "test", "config_hash": "c" * 16, "stage": 0, "layers": _LAYERS, "step": 1, "dtype": "float32"}

# a valid message per method (by the method's last two name parts): the fuzzer mutates these
_TEMPLATES: dict[str, dict] = {
    "stage.forward": {"stage": 0, "layers": _LAYERS, "request_id": "r1", "train": True, "seed": 1},
    "stage.backward": {"stage": 0, "layers": _LAYERS, "request_id": "r1", "num_samples": 2, "with_inputs": True},
    "stage.step": {"stage": 0, "layers": _LAYERS, "step": 0, "members": ["x"], "scheduled_time": 0.0},
    "stage.abort": {"stage": 0, "layers": _LAYERS, "step": 0, "members": ["x"]},
    "stage.info": {"stage": 0},
    "stage.state": {"stage": 0, "layers": _LAYERS, "with_optimizer": False},
    "stage.push": {"hops": [{"stage": 0, "layers": _LAYERS, "peer_id": "QmFuzzPeer", "request_id": "r1", "seed": 1}],
                   "mailbox": "m1", "num_samples": 2, "has_position_ids": True},
    "stage.collect": {"mailbox": "m1", "timeout": 0.01},
    "stage.kept": {"stage": 0, "layers": _LAYERS, "request_id": "r1", "grad": True},
    "probe.echo": {},
    "channel.open": {"public_key": "AAAA"},
    "inference.open": {"stage": 0, "layers": _LAYERS, "session_id": _SESSION, "batch_size": 1, "max_length": 8},
    "inference.step": {"session_id": _SESSION, "start": 0},
    "inference.close": {"session_id": _SESSION},
    "ledger.submit": {"version": 1, "entries": [{"seq": 0, "prev": "0" * 64, "run_id": "test", "peer_id": "p",
                                                 "public_key": "k", "stage": 0, "step_from": 0, "step_to": 1,
                                                 "started": 0.0, "ended": 1.0, "microbatches": 1, "tokens": 8}]},
    "ledger.fetch": {"version": 1, "offset": 0, "limit": 4},
    "ledger.tally": {"version": 1},
    "checkpoint.has": {"part": "stage-0"},
    "checkpoint.put": {"meta": _META, "names": ["param/w"]},
    "checkpoint.get": {"part": "stage-0"},
    "auth.token": {"key": "swk_00000000_x", "peer_id": "p", "public_key": "AAAA"},
    "auth.present": {"token": "AAAA"},
    # a token the fuzzed delegate does not accept: the fuzzer exercises parsing and refusals, not hosting
    "delegation.start": {"token": "not-the-token", "delegator": "QmFuzzDelegator", "stage": 1},
    "delegation.poll": {"session_id": _SESSION, "ack": 0},
    "delegation.stop": {"session_id": _SESSION, "ack": 0},
    "delegation.status": {},
    "data.lease": {"spec": {"source": "/data/train.jsonl", "num_shards": 4}, "ended": [[0, 1]]},
    "data.renew": {"dataset_id": "0123456789abcdef", "epoch": 0, "shard": 0,
                   "position": {"doc": 1, "offset": 2, "tokens": 3, "step": 1}, "done": False, "release": False},
    "data.eval": {"dataset_id": "0123456789abcdef", "step": 1, "loss": 2.5, "tokens": 64},
    "bootstrap.sync": {"run_id": "test", "sender": "a", "target": "b", "at": 0.0, "nonce": "0" * 32,
                       "run_state": {"state": "running", "at": 0.0}},
}


def template_for(method: str) -> dict:
    return dict(_TEMPLATES.get(".".join(method.split(".")[-2:]), {}))


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.binary(max_size=40),
    st.sampled_from(["", "x" * 10_000, "stage-0", "../../etc/passwd", "\x00"]),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                       max_leaves=12)


@st.composite
def _mutated(draw: st.DrawFn, template: dict) -> dict:
    message = dict(template)
    for key in draw(st.lists(st.sampled_from(sorted(template)), max_size=3, unique=True)) if template else []:
        if draw(st.booleans()):
            del message[key]
        else:
            message[key] = draw(_values)
    if draw(st.booleans()):
        message["version"] = draw(st.sampled_from([PROTOCOL_VERSION, 0, 1, 99, -1, "2", None, 2**63]))
    if draw(st.integers(0, 4)) == 0:
        message[draw(st.text(min_size=1, max_size=8))] = draw(_values)
    return message


def messages(method: str) -> st.SearchStrategy[Any]:
    """Mostly near-valid messages of ``method``, sometimes anything msgpack can carry."""
    template = template_for(method)
    return st.one_of(st.just(template), _mutated(template), _mutated(template), _values)


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool,
           torch.uint8]
_FILL = [0.0, 1.0, float("nan"), float("inf"), -float("inf"), 1e30, -3.0]


@st.composite
def _tensor(draw: st.DrawFn, hidden: int) -> torch.Tensor:
    dims = draw(st.lists(st.integers(0, 5), max_size=4))
    if dims and draw(st.booleans()):
        dims[-1] = hidden
    dtype = draw(st.sampled_from(_DTYPES))
    value = draw(st.sampled_from(_FILL))
    tensor = torch.randn(dims) if draw(st.booleans()) else torch.full(dims, value)
    if tensor.numel() and draw(st.booleans()):
        tensor.view(-1)[0] = value
    return tensor.to(dtype) if dtype is not torch.bool else tensor > 0


def tensor_lists(hidden: int) -> st.SearchStrategy[list[torch.Tensor]]:
    return st.lists(_tensor(hidden), max_size=3)


@st.composite
def _tensor_part(draw: st.DrawFn) -> runtime_pb2.Tensor:
    return runtime_pb2.Tensor(
        buffer=draw(st.binary(max_size=64)),
        size=draw(st.lists(st.integers(0, 2**32 - 1), max_size=4)),
        dtype=draw(st.sampled_from(["float32", "float16", "bfloat16", "int64", "bool", "object", "", "nonsense"])),
        compression=draw(st.sampled_from(list(runtime_pb2.CompressionType.values()) + [77])),
        chunks=draw(st.integers(-2**31, 2**31 - 1)),
    )


@st.composite
def raw_requests(draw: st.DrawFn, method: str) -> bytes:
    """The bytes a caller writes on a stream: frames of random or near-valid content, sometimes a
    header announcing far more than follows, sometimes cut short, sometimes without an end mark."""
    kind = draw(st.sampled_from(["bytes", "frames", "frames", "oversized"]))
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    metadata = draw(st.one_of(st.binary(max_size=64),
                              st.builds(lambda m, n: msgpack.packb([m, n], default=repr), messages(method),
                                        st.integers(-2, 2**31))))
    frame = runtime_pb2.ExpertRequest(metadata=metadata, tensors=draw(st.lists(_tensor_part(), max_size=3)))
    body = frame.SerializeToString()
    if kind == "oversized":  # a header that announces up to an exabyte, then a few bytes
        announced = draw(st.integers(len(body) + 1, 2**60))
        return P2P.MESSAGE_MARKER + announced.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + body[:64]
    data = P2P.MESSAGE_MARKER + len(body).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + body
    eos = P2P.END_OF_STREAM.SerializeToString()
    data += P2P.ERROR_MARKER + len(eos).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + eos
    return data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data


@st.composite
def raw_channel_requests(draw: st.DrawFn, method: str) -> bytes:
    """The bytes a caller writes on an authenticated data channel connection (``net.channel``): random
    bytes, or a header frame naming ``method`` whose tensor parts declare random dtypes and shapes (some
    with inline bytes, which the channel does not allow), then fewer, as many or more bytes than they
    announce, or a header announcing far more than follows."""
    kind = draw(st.sampled_from(["bytes", "frames", "frames", "oversized"]))
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    metadata = draw(st.one_of(st.binary(max_size=64),
                              st.builds(lambda m, n: msgpack.packb([m, n], default=repr), messages(method),
                                        st.integers(-2, 4))))
    parts = draw(st.lists(_tensor_part(), max_size=3))
    for part in parts:
        if draw(st.booleans()):
            part.ClearField("buffer")
            part.compression = runtime_pb2.CompressionType.NONE
            del part.size[:]
            part.size.extend(draw(st.lists(st.integers(0, 64), max_size=3)))
    frame = runtime_pb2.ExpertRequest(uid=draw(st.sampled_from([method, method, "", "nonsense"])), metadata=metadata,
                                      tensors=parts)
    body = frame.SerializeToString()
    if kind == "oversized":
        announced = draw(st.integers(len(body) + 1, 2**60))
        return P2P.MESSAGE_MARKER + announced.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + body[:64]
    return P2P.MESSAGE_MARKER + len(body).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + body + draw(st.binary(max_size=512))


def check_reply(method: str, reply: Any) -> None:
    """A reply is ``{"ok": ...}`` or ``{"error": {"code", "message"}}`` with a known code and a
    message that names the problem, and never an internal error (a bug the fuzzer found)."""
    assert isinstance(reply, dict) and len(reply) == 1 and set(reply) <= {"ok", "error"}, f"{method}: {reply!r:.300}"
    if "error" in reply:
        error = reply["error"]
        assert isinstance(error, dict) and error.get("message"), f"{method}: {reply!r:.300}"
        assert type(error_from_wire(str(error["code"]), "")).__name__ == error["code"], f"{method}: unknown code {error}"
        assert not str(error["message"]).startswith("internal error"), f"{method}: {error['message']}"


async def read_reply(reader: asyncio.StreamReader, timeout: float) -> Any | None:
    """The reply message a handler wrote on a raw stream, or None if none came within ``timeout`` s
    (a request cut short: the handler waits for the rest until the caller closes the stream)."""
    frames = read_frames(reader, runtime_pb2.ExpertResponse, max_total=1 << 26, refused=BadRequest, broken=BadRequest)
    try:
        first = await asyncio.wait_for(anext(frames, None), timeout)
    except asyncio.TimeoutError:
        return None
    finally:
        await frames.aclose()
    return None if first is None else msgpack.unpackb(first.metadata)[0]
