"""The P2P transport carries activations larger than a frame and a chunk, intact."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hivemind.p2p import P2P

from peers.training.client import StageClient
from net.transport import CHUNK_BYTES, FRAME_BYTES, P2PTransport
from net.rpc import Raw
from net.relay import circuit_address, reserve
from core.errors import PeerUnavailable

pytestmark = pytest.mark.slow


def test_a_large_activation_crosses_in_several_frames(model_factory, swarm_factory):
    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4)
    swarm = swarm_factory(model_dir, num_stages=2, num_peers=1)
    peer = swarm.peers[0]
    hidden = torch.randn(320, 256, 32, generator=torch.Generator().manual_seed(0))
    assert hidden.numel() * 4 > 2 * FRAME_BYTES > 2 * CHUNK_BYTES

    async def call():
        transport = P2PTransport(await swarm.bootstrap.dht.dht.replicate_p2p())
        try:
            out, _ = await StageClient(transport).forward(
                peer.peer_id, 0, peer.record.layers, "big", (hidden, None, None), train=False)
            return out
        finally:
            await transport.p2p.shutdown()

    got = swarm.loop.run(call(), timeout=120)
    with torch.no_grad():
        expected = peer.service.executor.module(hidden)
    assert torch.equal(got, expected)


def test_a_handler_that_fails_or_is_cancelled_under_it_still_replies_with_a_named_error():
    """A bug in a handler, or a future it awaits being cancelled (hivemind's averager can hand back
    asyncio's CancelledError), costs that request a named error; the stream is not just closed."""

    async def cancelled_under_it(message, tensors):
        waiting = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.05, waiting.cancel)
        await waiting
        return {"ok": {}}, []

    async def buggy(message, tensors):
        raise RuntimeError("the disk is full")

    async def echo(message, tensors):
        return {"ok": message}, tensors

    async def main():
        server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[
            str(a) for a in await server.get_visible_maddrs()])
        try:
            serving = P2PTransport(server)
            for method, handler in [("t.cancelled", cancelled_under_it), ("t.bug", buggy), ("t.echo", echo)]:
                await serving.serve(method, handler)
            caller, peer = P2PTransport(client), server.peer_id.to_base58()
            replies = [await caller.call(peer, method, Raw({"n": 1}), [], timeout=30)
                       for method in ("t.cancelled", "t.bug", "t.echo")]
            await serving.shutdown()
            return replies
        finally:
            await client.shutdown()
            await server.shutdown()

    (cancelled, _), (bug, _), (echoed, _) = asyncio.run(asyncio.wait_for(main(), 60))
    assert cancelled == {"error": {"code": "SwarmError", "message": "t.cancelled: the work was cancelled on this peer"}}
    assert bug == {"error": {"code": "SwarmError", "message": "internal error in t.bug: RuntimeError: the disk is full"}}
    assert echoed == {"ok": {"n": 1}}  # and the peer goes on serving


def test_a_caller_refused_again_and_again_is_held_while_others_are_served_at_once():
    """The gate answers a caller without a token at once the first ``FREE_REFUSALS`` times, then holds
    each refusal ``REFUSAL_HOLD`` s, unread (issue 22's flood); a member's calls are not held meanwhile."""
    from net.admission import FREE_REFUSALS, REFUSAL_HOLD
    from core.errors import AuthRejected

    async def echo(message, tensors):
        return {"ok": message}, tensors

    async def timed(transport: P2PTransport, peer: str) -> tuple[dict, float]:
        started = asyncio.get_running_loop().time()
        reply, _ = await transport.call(peer, "t.echo", Raw({"n": 1}), [], timeout=30)
        return reply, asyncio.get_running_loop().time() - started

    async def main():
        server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        maddrs = [str(a) for a in await server.get_visible_maddrs()]
        stranger_p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs)
        member_p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs)
        member_id = member_p2p.peer_id.to_base58()

        class OnlyTheMember:
            def check(self, caller: str | None) -> None:
                if caller != member_id:
                    raise AuthRejected("no valid token")

        try:
            serving = P2PTransport(server, gate=OnlyTheMember())
            await serving.serve("t.echo", echo)
            peer, stranger, member = server.peer_id.to_base58(), P2PTransport(stranger_p2p), P2PTransport(member_p2p)
            refused = [await timed(stranger, peer) for _ in range(FREE_REFUSALS)]
            held = asyncio.ensure_future(timed(stranger, peer))
            await asyncio.sleep(0.2)
            served = await timed(member, peer)
            await serving.shutdown()
            return refused, await held, served
        finally:
            for p2p in (member_p2p, stranger_p2p, server):
                await p2p.shutdown()

    refused, held, served = asyncio.run(asyncio.wait_for(main(), 60))
    for reply, took in [*refused, held]:
        assert reply["error"]["code"] == "AuthRejected", reply
    assert all(took < REFUSAL_HOLD / 2 for _, took in refused), refused
    assert held[1] >= REFUSAL_HOLD, held
    assert served[0] == {"ok": {"n": 1}} and served[1] < REFUSAL_HOLD / 2, served


def test_a_peer_is_reached_through_its_relay_slot_before_a_call_and_for_others_sharing_the_daemon():
    """Real daemons on loopback: a peer reserves a slot on a relay (``net.relay.reserve``); a caller
    that knows only its circuit address (``addresses``, as ``SwarmDHT.relayed`` holds it) reaches it
    through the relay, with ``reach`` (what a replica does before an averaging round, for hivemind's
    averager that dials by peer id) and with a call; a peer behind a relay that holds no slot for it is
    named as unreachable, and a call to it fails as a peer that is gone."""

    async def echo(message, tensors):
        return {"ok": message}, tensors

    async def main():
        relay = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], force_reachability="public")
        home = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        caller = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            relay_maddr = f"{(await relay.get_visible_maddrs())[0]}"
            slot = await reserve(home, relay_maddr, min_data=0)  # libp2p's default limits: these calls are small
            peer = home.peer_id.to_base58()
            serving = P2PTransport(home)
            await serving.serve("t.echo", echo)
            stranger = "12D3KooWJ72gWBLNwkEnEzNaSGewDWKbfyZrVm6uw2tvcgxNhXG9"  # no slot on the relay
            addresses = {peer: [slot.address(peer)], stranger: [circuit_address(relay_maddr, slot.relay, stranger)]}
            calls = P2PTransport(caller, addresses=addresses)
            unreached = await calls.reach([peer, stranger])
            connected = {p.peer_id.to_base58(): [str(a) for a in p.addrs] for p in await caller.list_peers()}
            reply, _ = await calls.call(peer, "t.echo", Raw({"n": 2}), [], timeout=30)
            with pytest.raises(PeerUnavailable, match="not reachable through its relay"):
                await calls.call(stranger, "t.echo", Raw({"n": 3}), [], timeout=30)
            await serving.shutdown()
            return slot, unreached, connected, reply, peer, stranger
        finally:
            for p2p in (caller, home, relay):
                await p2p.shutdown()

    slot, unreached, connected, reply, peer, stranger = asyncio.run(asyncio.wait_for(main(), 90))
    assert slot.expires > time.time() + 60
    assert [why.split(" is not reachable")[0] for why in unreached] == [stranger[-8:]]
    assert any("/p2p-circuit" in a for a in connected[peer]), connected  # through the relay, not directly
    assert reply == {"ok": {"n": 2}}
