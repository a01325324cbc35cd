"""A relay that would cut relayed connections at libp2p's default 128 KiB is refused (hivemind's p2pd
answers with that default until its configured relay service starts: ``net.relay``). Real daemons
on loopback; the relays with their own limits are tested in namespaces (``tests/e2e/test_nat.py``)."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.p2p import P2P

from core.errors import PeerUnavailable
from dht.records import SwarmDHT
from net.relay import reserve

pytestmark = pytest.mark.slow


def test_a_peer_behind_nat_refuses_a_slot_that_cuts_at_128_kib():
    """A relay whose limit is libp2p's default is refused, naming the limit, so ``RelaySlot`` moves
    to the next candidate instead of announcing a circuit that cuts every large call."""

    async def run() -> None:
        relay = SwarmDHT.create("relay-limits", host="127.0.0.1", relay=True, relay_limits=(128, 16, 128 << 10))
        home = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            address = next(str(a) for a in relay.dht.get_visible_maddrs())
            with pytest.raises(PeerUnavailable, match=r"after 131,072 bytes \(at least 67,108,864 needed\)"):
                await reserve(home, address)
            slot = await reserve(home, address, min_data=0)
            assert slot.data_limit == 128 << 10 and slot.relay == relay.peer_id
        finally:
            await home.shutdown()
            relay.shutdown()

    asyncio.run(run())
