"""The handlers and the request reader fuzzed in one process (no network), with many examples.

The stage and inference handlers of a tiny stage, the token and present handlers of keyed runs (served
on keyed runs only, so ``tests/integration/test_fuzz_rpc.py`` cannot reach them), and the transport's
request reader fed raw bytes: every reply a named error or a valid answer, never an internal error.
The frame reader refuses an announced frame before its body arrives, a stream over its total, and a
stalled stream.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest
from hivemind.proto import runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey
from hypothesis import given

from bootstrap.state import StateDB
from bootstrap.tokens import TokenService
from dht.auth import issue_token
from dht.schemas import OptimizerSettings
from net.auth import PRESENT, TOKEN, AuthGate
from peers.training.executor import StageExecutor
from net.framing import read_frames
from peers.inference.sessions import InferenceSessions
from peers.inference.service import InferenceService
from peers.training.service import StageService
from net.transport import CALLER, _answer
from shards import LayerRange, load_stage
from core.errors import BadRequest
from tests.fuzzing import FUZZ_SETTINGS, check_reply, messages, raw_requests, tensor_lists

HIDDEN = 32
LAYERS = LayerRange(start=0, end=1)


@pytest.fixture(scope="module")
def handlers(model_factory, tmp_path_factory):
    """Every handler of a stage peer and of a bootstrap's token service, by method."""
    module = load_stage(str(model_factory("gpt2", num_layers=2, hidden_size=HIDDEN, num_heads=4)), LAYERS)
    worker = ThreadPoolExecutor(max_workers=1)
    service = StageService(StageExecutor(module, 0, LAYERS, OptimizerSettings(lr=1e-3)), "me", worker=worker)
    sessions = InferenceSessions(module, 0, LAYERS, memory_budget=1 << 24, idle_timeout=60.0)
    authority = RSAPrivateKey()
    db = StateDB(tmp_path_factory.mktemp("state") / "state.db")
    yield {**service.handlers(), **InferenceService(sessions, worker).handlers(),
           PRESENT: AuthGate(authority.get_public_key().to_bytes()).rpc_present,
           TOKEN: TokenService(db, authority, ttl=60.0).rpc_token}
    worker.shutdown(wait=True)


def _run(handler, message, tensors) -> dict:
    async def call():
        CALLER.set("fuzzer")
        return await handler(msgpack.unpackb(msgpack.packb(message, default=repr)), tensors)

    reply, _ = asyncio.run(call())
    return msgpack.unpackb(msgpack.packb(reply))


METHODS = ["swarm.stage.forward", "swarm.stage.backward", "swarm.stage.step", "swarm.stage.abort",
           "swarm.stage.info", "swarm.stage.state", "swarm.inference.open", "swarm.inference.step",
           "swarm.inference.close", PRESENT, TOKEN]


@pytest.mark.parametrize("method", METHODS)
def test_handlers_answer_malformed_requests_with_named_errors(handlers, method):
    handler = handlers[method]

    @FUZZ_SETTINGS
    @given(message=messages(method), tensors=tensor_lists(HIDDEN))
    def one(message, tensors):
        check_reply(method, _run(handler, message, tensors))

    one()


async def _echo(message, tensors):
    return {"ok": {"n": len(tensors)}}, tensors


@FUZZ_SETTINGS
@given(data=raw_requests("swarm.stage.forward"))
def test_the_request_reader_refuses_raw_garbage(data):
    async def read():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await _answer("fuzz", _echo, reader, 1 << 20)

    answer = asyncio.run(read())
    assert answer is not None
    reply, _, unread = answer
    check_reply("fuzz", msgpack.unpackb(msgpack.packb(reply)))
    assert not unread or "error" in reply  # only a refused request can leave bytes unread


def _frames_of(reader, **limits):
    return read_frames(reader, runtime_pb2.ExpertRequest, refused=BadRequest, broken=BadRequest, **limits)


def test_an_announced_frame_over_the_limit_is_refused_before_its_body():
    async def read():
        reader = asyncio.StreamReader()
        reader.feed_data(b"\x00" + (1 << 40).to_bytes(8, "big"))  # the header alone: no body was sent
        return [f async for f in _frames_of(reader, max_total=None)]

    with pytest.raises(BadRequest, match="frame of 1099511627776 bytes"):
        asyncio.run(asyncio.wait_for(read(), 5))


def test_frames_over_the_total_are_refused_at_the_header_that_crosses_it():
    body = runtime_pb2.ExpertRequest(metadata=b"x" * 1000).SerializeToString()
    frame = b"\x00" + len(body).to_bytes(8, "big") + body

    async def read():
        reader = asyncio.StreamReader()
        reader.feed_data(frame * 3 + b"\x00" + len(body).to_bytes(8, "big"))  # a 4th header, no body
        seen = []
        with pytest.raises(BadRequest, match="request larger than"):
            async for f in _frames_of(reader, max_total=3 * len(body) + 10):
                seen.append(f)
        return seen

    assert len(asyncio.run(asyncio.wait_for(read(), 5))) == 3


def test_a_stalled_stream_is_given_up():
    async def read():
        reader = asyncio.StreamReader()
        reader.feed_data(b"\x00" + (100).to_bytes(8, "big") + b"abc")  # 3 of 100 bytes, then nothing
        return [f async for f in _frames_of(reader, max_total=None, idle=0.2)]

    with pytest.raises(BadRequest, match="stalled"):
        asyncio.run(asyncio.wait_for(read(), 5))


def test_the_end_mark_ends_the_frames_and_an_error_frame_is_reported():
    from hivemind.p2p import P2P
    from hivemind.proto.p2pd_pb2 import RPCError

    def frame(marker: bytes, message) -> bytes:
        body = message.SerializeToString()
        return marker + len(body).to_bytes(8, "big") + body

    async def read(data: bytes):
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        return [f.metadata async for f in _frames_of(reader, max_total=None)]

    one = frame(P2P.MESSAGE_MARKER, runtime_pb2.ExpertRequest(metadata=b"m"))
    assert asyncio.run(read(one + frame(P2P.ERROR_MARKER, RPCError()) + one)) == [b"m"]  # stops at the mark
    with pytest.raises(BadRequest, match="the other side failed: boom"):
        asyncio.run(read(one + frame(P2P.ERROR_MARKER, RPCError(message="boom"))))
    with pytest.raises(BadRequest, match="invalid frame marker"):
        asyncio.run(read(b"\x07" + (0).to_bytes(8, "big")))


def test_a_valid_token_is_still_accepted_after_fuzzing(handlers):
    """The gate keeps working: a token of its authority for the caller passes."""
    del handlers
    authority = RSAPrivateKey()
    gate = AuthGate(authority.get_public_key().to_bytes())
    token = issue_token(authority, "k1", "fuzzer", b"key", 4e9)
    reply = _run(gate.rpc_present, {"token": token}, [])
    assert reply["ok"]["expires"] == 4e9
