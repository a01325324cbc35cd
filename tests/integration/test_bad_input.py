"""A peer answers malformed requests with an error naming the problem and keeps serving."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from peers.training.client import StageClient
from peers.training.protocol import FORWARD, ForwardRequest, ForwardResponse
from net.rpc import parse_reply
from net.transport import P2PTransport
from core.errors import BadRequest, ProtocolMismatch, SwarmError, WrongStage
from net.rpc import Raw

pytestmark = pytest.mark.slow


def _forward_message(**overrides) -> dict:
    fields = dict(stage=0, layers={"start": 0, "end": 1}, request_id="r1")
    return ForwardRequest(**(fields | overrides)).model_dump(mode="json")


BAD_REQUESTS = [
    # (name, message, tensors-maker, error type, words the message must contain)
    ("not-a-map", "hello", lambda h: [h], BadRequest, "expected a map"),
    ("missing-field", {"stage": 0}, lambda h: [h], BadRequest, "layers"),
    ("wrong-version", {"version": 99}, lambda h: [h], ProtocolMismatch, "version 99"),
    ("unknown-stage", _forward_message(stage=7), lambda h: [h], WrongStage, "not stage 7"),
    ("layers-not-held", _forward_message(layers={"start": 1, "end": 2}), lambda h: [h], WrongStage, "[1, 2)"),
    ("wrong-width", _forward_message(), lambda h: [torch.zeros(2, 4, h.shape[-1] + 1)], BadRequest, "shape"),
    ("wrong-dtype", _forward_message(), lambda h: [h.double()], BadRequest, "float64"),
    ("integer-hidden", _forward_message(), lambda h: [h.long()], BadRequest, "floating"),
    ("too-many-tensors", _forward_message(), lambda h: [h, h], BadRequest, "expected 1 tensor"),
    ("bad-mask-shape", _forward_message(has_attention_mask=True), lambda h: [h, torch.ones(3, 3).long()],
     BadRequest, "attention_mask"),
]


RAW_REQUESTS_EXPECTED = [
    ("garbage-bytes", b"\xc1\xc1 not msgpack", "not valid msgpack"),
    ("no-envelope", msgpack.packb({"stage": 0}), "must be [message, number of tensors]"),
    ("truncated", msgpack.packb([_forward_message(), 1]), "0 of 1 tensor(s)"),
]
RAW_REQUESTS = [(name, metadata) for name, metadata, _ in RAW_REQUESTS_EXPECTED]


def test_bad_requests_get_clear_errors_and_the_peer_keeps_serving(model_factory, swarm_factory):
    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4)
    swarm = swarm_factory(model_dir, num_stages=2, num_peers=1)
    peer = swarm.peers[0]
    hidden = torch.randn(2, 4, 32)

    async def scenario() -> list:
        transport = P2PTransport(await swarm.bootstrap.dht.dht.replicate_p2p())  # a caller other than the peer
        outcomes = []
        try:
            for name, message, make, _, _ in BAD_REQUESTS:
                reply, _ = await transport.call(peer.peer_id, FORWARD, Raw(message), make(hidden), timeout=30)
                try:
                    parse_reply(ForwardResponse, reply)
                    outcomes.append((name, None))
                except SwarmError as e:
                    outcomes.append((name, e))
            # raw frames: not msgpack at all, no envelope, and a truncated request
            for name, metadata in RAW_REQUESTS:
                frames = [runtime_pb2.ExpertRequest(metadata=metadata)]
                stream = await transport.p2p.iterate_protobuf_handler(
                    PeerID.from_base58(peer.peer_id), FORWARD, _aiter(frames), runtime_pb2.ExpertResponse)
                raw = [frame async for frame in stream]
                reply, count = msgpack.unpackb(raw[0].metadata)
                outcomes.append((name, (reply, count)))
            # and a valid request still works
            good, _ = await StageClient(transport).forward(
                peer.peer_id, 0, peer.record.layers, "ok1", (hidden, None, None), train=False)
            outcomes.append(("valid", good))
        finally:
            await transport.p2p.shutdown()
        return outcomes

    outcomes = dict(swarm.loop.run(scenario(), timeout=120))
    for name, _, _, error_type, words in BAD_REQUESTS:
        error = outcomes[name]
        assert isinstance(error, error_type), f"{name}: got {error!r}"
        assert words in str(error), f"{name}: {error}"
    for name, _, words in RAW_REQUESTS_EXPECTED:
        reply, count = outcomes[name]
        assert count == 0 and reply["error"]["code"] == "BadRequest", name
        assert words in reply["error"]["message"], reply
    expected = peer.service.executor.module(hidden)
    assert torch.allclose(outcomes["valid"], expected, atol=1e-6)
    # undecodable bytes are refused by the transport before they reach the service
    assert peer.service.errors_replied == len(BAD_REQUESTS)


async def _aiter(items):
    for item in items:
        yield item
