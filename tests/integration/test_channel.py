"""The direct data channel (``net.channel``) between real hivemind P2P nodes on loopback: calls go over
it when the callee can be dialled, fall back to libp2p when it cannot, refuse a caller that lies about
its identity, and answer malformed frames with a named error while serving on."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey

from core.errors import AuthRejected, BadRequest
from core.loop import LoopThread
from net.channel import OPEN, ChannelOpen, ChannelServer, Identity, header_frame, read_header, read_tensors
from net.rpc import Raw
from net.transport import CALLER, P2PTransport

pytestmark = pytest.mark.slow

LIMIT = 1 << 20


async def _echo(message, tensors):
    return {"ok": message}, [t * 2 if t.dtype.is_floating_point else t for t in tensors]


async def _pair(*, tls: bool = True, announce: list[str] | None = None, gate=None):
    """A serving node with a channel and a calling node using channels, both real P2P nodes."""
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                              initial_peers=[str(a) for a in await server.get_visible_maddrs()])
    serving, calling = P2PTransport(server, gate=gate), P2PTransport(client)
    await serving.serve("t.echo", _echo, max_request_bytes=LIMIT)
    await serving.open_channel(ChannelServer(Identity(server.peer_id.to_base58(), RSAPrivateKey()), "127.0.0.1",
                                             tls=tls, announce=announce or []))
    calling.use_channel(Identity(client.peer_id.to_base58(), RSAPrivateKey()))
    return server, client, serving, calling


async def _close(*nodes) -> None:
    for transport in nodes:
        await transport.close()


class _Gate:
    """A keyed run's gate: callers in ``allowed`` pass, others are refused with ``why``."""

    def __init__(self, why: str):
        self.why, self.allowed = why, set()

    def check(self, caller):
        if caller not in self.allowed:
            raise AuthRejected(self.why)


TENSORS = [torch.randn(4, 128, 64), torch.randn(3, 5).to(torch.bfloat16), torch.arange(7),
           torch.tensor([True, False, True]), torch.empty(0, 4)]


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_a_call_goes_over_the_direct_channel_intact(tls):
    async def main():
        server, client, serving, calling = await _pair(tls=tls)
        try:
            peer = server.peer_id.to_base58()
            replies = [await calling.call(peer, "t.echo", Raw({"n": n}), TENSORS, timeout=30) for n in range(3)]
            return replies, dict(calling.channel.sent), dict(serving.channel_server.served)
        finally:
            await _close(calling, serving)

    replies, sent, served = asyncio.run(asyncio.wait_for(main(), 60))
    for n, (reply, out) in enumerate(replies):
        assert reply == {"ok": {"n": n}}
        assert [t.dtype for t in out] == [t.dtype for t in TENSORS]
        assert torch.equal(out[0], TENSORS[0] * 2) and torch.equal(out[1], TENSORS[1] * 2)
        assert torch.equal(out[2], TENSORS[2]) and torch.equal(out[3], TENSORS[3]) and out[4].shape == (0, 4)
    assert sent == {"t.echo": 3} and served == {"t.echo": 3}


def test_an_undialable_channel_falls_back_to_libp2p():
    """The offered address refuses the connection (127.0.0.2: the listener is on 127.0.0.1 only, as a
    peer behind NAT announces an address nobody reaches): the call goes through libp2p, intact."""

    async def main():
        server, client, serving, calling = await _pair(announce=["127.0.0.2"])
        try:
            peer = server.peer_id.to_base58()
            replies = [await calling.call(peer, "t.echo", Raw({"n": n}), TENSORS[:1], timeout=30) for n in range(2)]
            return replies, dict(calling.channel.sent), dict(calling.channel.fallbacks), dict(serving.channel_server.served)
        finally:
            await _close(calling, serving)

    replies, sent, fallbacks, served = asyncio.run(asyncio.wait_for(main(), 60))
    assert [reply for reply, _ in replies] == [{"ok": {"n": 0}}, {"ok": {"n": 1}}]
    assert torch.equal(replies[1][1][0], TENSORS[0] * 2)
    assert sent == {} and served == {} and fallbacks == {"t.echo": 2}


def test_a_peer_that_lies_about_its_identity_is_refused():
    """A second real identity (its own P2P node and record key) gets its own ticket, then claims the
    first caller's peer id with it, or presents the first caller's ticket signed with its own key:
    both handshakes are refused, and the honest caller is served throughout."""

    async def main():
        server, client, serving, calling = await _pair()
        liar_p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                    initial_peers=[str(a) for a in await server.get_visible_maddrs()])
        liar = P2PTransport(liar_p2p)
        try:
            peer, honest_id = server.peer_id.to_base58(), client.peer_id.to_base58()
            await calling.call(peer, "t.echo", Raw({}), [], timeout=30)
            honest_offer = calling.channel._routes[peer].offer
            liar_key = RSAPrivateKey()
            liar.use_channel(Identity(honest_id, liar_key))  # claims the honest peer id
            own_offer = await liar._ask_offer(peer, ChannelOpen(public_key=Identity(honest_id, liar_key).public_key))
            errors = []
            for offer in (own_offer, honest_offer):
                try:
                    await liar.channel._dial(peer, offer)
                except AuthRejected as e:
                    errors.append(str(e))
            after = await calling.call(peer, "t.echo", Raw({"still": 1}), [], timeout=30)
            return errors, after[0], dict(serving.channel_server.served)
        finally:
            await _close(liar, calling, serving)

    errors, after, served = asyncio.run(asyncio.wait_for(main(), 60))
    assert len(errors) == 2, errors
    assert "was issued to" in errors[0] and "not signed by its record key" in errors[1], errors
    assert after == {"ok": {"still": 1}} and served == {"t.echo": 2}


def _frame(body: bytes) -> bytes:
    return P2P.MESSAGE_MARKER + len(body).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + body


def _request(metadata, tensors=(), uid="t.echo") -> runtime_pb2.ExpertRequest:
    frame = runtime_pb2.ExpertRequest(uid=uid, metadata=msgpack.packb(metadata))
    for dtype, size in tensors:
        frame.tensors.add(dtype=dtype, size=size, chunks=1)
    return frame


MALFORMED = {
    "not a protobuf": _frame(b"\xff\x01garbage"),
    "not msgpack": _frame(runtime_pb2.ExpertRequest(uid="t.echo", metadata=b"\xc1").SerializeToString()),
    "envelope says 2, header 1": _frame(_request([{}, 2], [("float32", [4])]).SerializeToString()),
    "unknown dtype": _frame(_request([{}, 1], [("float99", [4])]).SerializeToString()),
    "over the method's limit": _frame(_request([{}, 1], [("float32", [LIMIT])]).SerializeToString()),
    "unknown method": _frame(_request([{}, 0], uid="t.nothing").SerializeToString()),
    "a shape past int64": _frame(_request([{}, 1], [("float32", [(1 << 31) - 1] * 4)]).SerializeToString()),
    "a frame of 1 TiB": P2P.MESSAGE_MARKER + (1 << 40).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER),
    "truncated inside a tensor": _frame(_request([{}, 1], [("float32", [1024])]).SerializeToString()) + b"\0" * 100,
}

EXPECTED = {
    "not a protobuf": "not a valid ExpertRequest",
    "not msgpack": "not valid msgpack",
    "envelope says 2, header 1": "announces 2 tensor(s), the header describes 1",
    "unknown dtype": "float99",
    "over the method's limit": "request larger than 1 MiB",
    "unknown method": "does not serve 't.nothing'",
    "a shape past int64": "request larger than 1 MiB",
    "a frame of 1 TiB": "frames are at most 16 MiB",
    "truncated inside a tensor": None,  # the caller is gone: no reply to read, the server just serves on
}


def test_malformed_channel_frames_get_a_named_error_and_the_peer_serves_on():
    async def main():
        server, client, serving, calling = await _pair()
        try:
            peer = server.peer_id.to_base58()
            answers = {}
            for name, data in MALFORMED.items():
                reader, writer = await calling.channel._connection(peer)
                writer.write(data)
                if EXPECTED[name] is None:
                    writer.close()
                    continue
                header = await asyncio.wait_for(read_header(reader, runtime_pb2.ExpertResponse, broken=AuthRejected,
                                                            idle=10), 10)
                answers[name] = header.message
                writer.close()
            reply, out = await calling.call(peer, "t.echo", Raw({"after": 1}), TENSORS[:1], timeout=30)
            return answers, reply, out
        finally:
            await _close(calling, serving)

    answers, reply, out = asyncio.run(asyncio.wait_for(main(), 90))
    for name, expected in EXPECTED.items():
        if expected is not None:
            assert expected in answers[name]["error"]["message"], (name, answers[name])
            assert answers[name]["error"]["code"] == "BadRequest", (name, answers[name])
    assert reply == {"ok": {"after": 1}} and torch.equal(out[0], TENSORS[0] * 2)


def test_the_offer_is_served_over_libp2p_and_names_the_listener():
    async def main():
        server, client, serving, calling = await _pair()
        try:
            reply, _ = await calling.call(server.peer_id.to_base58(), OPEN, Raw({"public_key": "bm90IGEga2V5"}), [],
                                          timeout=30)
            offer = await calling._ask_offer(server.peer_id.to_base58(),
                                             ChannelOpen(public_key=calling.channel.identity.public_key))
            return reply, offer, serving.channel_server.port
        finally:
            await _close(calling, serving)

    bad, offer, port = asyncio.run(asyncio.wait_for(main(), 60))
    assert bad["error"]["code"] == "BadRequest" and "public_key" in bad["error"]["message"]
    assert offer.hosts == ["127.0.0.1"] and offer.port == port and offer.tls and len(offer.fingerprint) == 64


def test_the_header_describes_each_tensor_and_carries_its_memory_uncopied():
    tensor = torch.randn(8, 16)
    header, views = header_frame(runtime_pb2.ExpertRequest, "m", {"a": 1}, [tensor])
    assert len(views) == 1 and views[0].nbytes == tensor.numel() * 4
    assert views[0].obj.__array_interface__["data"][0] == tensor.data_ptr()  # the tensor's own memory
    frame = runtime_pb2.ExpertRequest.FromString(header[1 + P2P.HEADER_LEN:])
    assert frame.uid == "m" and list(frame.tensors[0].size) == [8, 16] and frame.tensors[0].dtype == "float32"


def test_a_small_call_is_read_in_one_piece_each_tensor_intact_and_aligned():
    # under 64 KiB: one read into one buffer; the odd-sized bool tensor puts the next ones off their alignment
    sent = [torch.tensor([True, False, True]), torch.randn(5, 3), torch.randn(3).to(torch.bfloat16),
            torch.arange(2), torch.empty(0, 4), torch.randn(2, 2)]
    header, views = header_frame(runtime_pb2.ExpertRequest, "m", {"a": 1}, sent)

    async def read():
        reader = asyncio.StreamReader()
        reader.feed_data(b"".join([header, *views]))
        reader.feed_eof()
        got = await read_header(reader, runtime_pb2.ExpertRequest, broken=BadRequest, idle=None)
        return await read_tensors(reader, got, limit=1 << 20, broken=BadRequest, idle=5.0), reader.at_eof()

    out, drained = asyncio.run(read())
    assert drained and [t.dtype for t in out] == [t.dtype for t in sent] and out[4].shape == (0, 4)
    assert all(torch.equal(a, b) for a, b in zip(out, sent))
    assert all(t.data_ptr() % t.element_size() == 0 for t in out)
    out[1].add_(1)  # a handler may write into what it was sent
    assert torch.equal(out[1], sent[1] + 1)


def test_a_small_call_cut_short_is_a_named_error():
    header, views = header_frame(runtime_pb2.ExpertRequest, "m", {"a": 1}, [torch.randn(4, 4)])

    async def read():
        reader = asyncio.StreamReader()
        reader.feed_data(header + bytes(views[0])[:10])
        reader.feed_eof()
        got = await read_header(reader, runtime_pb2.ExpertRequest, broken=BadRequest, idle=None)
        return await read_tensors(reader, got, limit=1 << 20, broken=BadRequest, idle=5.0)

    with pytest.raises(BadRequest, match="closed inside 64 bytes of tensors"):
        asyncio.run(read())


def test_stop_closes_the_listener_and_its_connections():
    async def main():
        server, client, serving, calling = await _pair()
        try:
            await calling.call(server.peer_id.to_base58(), "t.echo", Raw({}), [], timeout=30)
            port = serving.channel_server.port
            (reader, _), = calling.channel._routes[server.peer_id.to_base58()].idle
            await serving.close()
            closed = await asyncio.wait_for(reader.read(1), 5)
            try:
                await asyncio.open_connection("127.0.0.1", port)
                refused = False
            except OSError:
                refused = True
            return closed, refused, serving.channel_server
        finally:
            await _close(calling, serving)

    closed, refused, left = asyncio.run(asyncio.wait_for(main(), 60))
    assert closed == b"" and refused and left is None


def test_a_forked_child_does_not_keep_the_channel_open():
    """hivemind forks its DHT and averager processes from a running peer: their copies of the channel's
    sockets are closed in the child, so a stopped channel refuses new dials and its connections end."""
    import multiprocessing

    async def main():
        server, client, serving, calling = await _pair()
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,), daemon=True)
        try:
            await calling.call(server.peer_id.to_base58(), "t.echo", Raw({}), [], timeout=30)
            (reader, _), = calling.channel._routes[server.peer_id.to_base58()].idle
            child.start()
            port = serving.channel_server.port
            await serving.close()
            closed = await asyncio.wait_for(reader.read(1), 5)
            try:
                await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
                refused = False
            except OSError:
                refused = True
            return child.is_alive(), closed, refused
        finally:
            child.kill()
            child.join(10)
            await _close(calling, serving)

    alive, closed, refused = asyncio.run(asyncio.wait_for(main(), 60))
    assert alive and closed == b"" and refused


def test_on_a_keyed_run_the_channel_is_offered_once_the_caller_presented():
    """The offer is gated like every method: the presentation itself goes on libp2p, the calls after it
    on the channel, where the gate is checked again with the caller's peer id from the handshake."""

    gate = _Gate("present a token first")

    async def present(message, tensors):
        gate.allowed.add(CALLER.get())
        return {"ok": {}}, []

    async def main():
        server, client, serving, calling = await _pair(gate=gate)
        await serving.serve("t.present", present, public=True)
        try:
            peer = server.peer_id.to_base58()
            before, _ = await calling.call(peer, "t.echo", Raw({"n": 0}), [], timeout=30)
            await calling.call(peer, "t.present", Raw({}), [], timeout=30)
            after, out = await calling.call(peer, "t.echo", Raw({"n": 1}), TENSORS[:1], timeout=30)
            return (before, after, out, dict(calling.channel.sent), dict(calling.channel.fallbacks),
                    dict(serving.channel_server.served))
        finally:
            await _close(calling, serving)

    before, after, out, sent, fallbacks, served = asyncio.run(asyncio.wait_for(main(), 60))
    assert before["error"]["code"] == "AuthRejected" and after == {"ok": {"n": 1}}
    assert torch.equal(out[0], TENSORS[0] * 2)
    assert fallbacks == {"t.echo": 1, "t.present": 1} and sent == {"t.echo": 1} and served == {"t.echo": 1}



@pytest.mark.parametrize("size", [64, LIMIT // 4 - 1024], ids=["small", "big"])
def test_after_a_refused_call_the_next_call_is_answered_not_cut(size):
    """A revoked caller: the gate refuses its call before the tensors are read, and the callee closes
    that connection. The caller's very next call (presenting its token again, a public method) must
    be answered, not sent down the closed connection from the pool ("the connection closed before
    the reply", which made a revoked trainer take the peer for broken); and a refused call's answer
    arrives whole, not overtaken by a reset for the bytes the callee never read. The callee runs on
    an event loop of its own, as a peer does beside a trainer."""

    gate = _Gate("this caller's key was revoked")

    async def present(message, tensors):
        return {"ok": {}}, []

    async def serve():
        server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        serving = P2PTransport(server, gate=gate)
        await serving.serve("t.echo", _echo, max_request_bytes=LIMIT)
        await serving.serve("t.present", present, public=True)
        await serving.open_channel(ChannelServer(Identity(server.peer_id.to_base58(), RSAPrivateKey()), "127.0.0.1"))
        return server.peer_id.to_base58(), serving, [str(a) for a in await server.get_visible_maddrs()]

    async def main(peer, maddrs):
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs)
        calling = P2PTransport(client)
        calling.use_channel(Identity(client.peer_id.to_base58(), RSAPrivateKey()))
        tensors = [torch.randn(size)]
        try:
            gate.allowed.add(client.peer_id.to_base58())
            ok, _ = await calling.call(peer, "t.echo", Raw({"n": 0}), tensors, timeout=30)
            gate.allowed.clear()
            answers = []
            for n in range(30):
                refused, _ = await calling.call(peer, "t.echo", Raw({"n": n}), tensors, timeout=30)
                presented, _ = await calling.call(peer, "t.present", Raw({}), [], timeout=30)
                answers.append((refused["error"]["code"], presented))
            return ok, answers, dict(calling.channel.sent)
        finally:
            await calling.close()

    callee = LoopThread("callee")
    try:
        peer, serving, maddrs = callee.run(serve(), 60)
        try:
            ok, answers, sent = asyncio.run(asyncio.wait_for(main(peer, maddrs), 120))
        finally:
            callee.run(serving.close(), 30)
    finally:
        callee.stop()
    assert ok == {"ok": {"n": 0}}
    assert answers == [("AuthRejected", {"ok": {}})] * 30
    assert sent == {"t.echo": 31, "t.present": 30}, "every call went over the channel"
