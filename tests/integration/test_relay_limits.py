"""A relay applies its own limits: hivemind's p2pd (v0.5.0.hivemind1) starts two relay services and,
about one start in three here, answers with the one that has libp2p's defaults (128 KiB and 2
minutes per relayed connection), which cuts one stage's activations or weights. Real daemons on
loopback."""

from __future__ import annotations

import asyncio
import functools
import logging

import pytest
from hivemind.p2p import P2P

from core.errors import PeerUnavailable
from dht.records import SwarmDHT
from net.relay import _announced_limit, reserve, start_relaying

pytestmark = pytest.mark.slow

LIMITS = (128, 16, 4 << 30)


def test_a_relay_node_announces_its_own_limit_after_every_start(caplog):
    """Six starts: without the check about two of them announce libp2p's 128 KiB (measured 2 of 6
    in a row); with it each announces the limit it was given, restarting where needed."""

    async def starts() -> list[int]:
        announced = []
        for _ in range(6):
            create = functools.partial(SwarmDHT.create, "relay-limits", host="127.0.0.1", relay=True,
                                       relay_limits=LIMITS)
            dht = await start_relaying(create, LIMITS, host="127.0.0.1")
            try:
                announced.append(await _announced_limit(dht))
            finally:
                dht.shutdown()
        return announced

    with caplog.at_level(logging.INFO, logger="net.relay"):
        assert asyncio.run(starts()) == [LIMITS[2]] * 6
    restarts = [r.getMessage() for r in caplog.records if "restarting the node" in r.getMessage()]
    assert all("131,072 bytes" in message for message in restarts), restarts


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
