"""The P2P transport carries activations larger than a frame and a chunk, intact."""

from __future__ import annotations

import pytest
import torch

from peers.client import StageClient
from peers.transport import CHUNK_BYTES, FRAME_BYTES, P2PTransport

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
