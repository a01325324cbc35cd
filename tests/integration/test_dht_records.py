"""Records in a real hivemind DHT on loopback: signed (nobody overwrites another's), schema-checked,
expiring, and superseded by 'offline' when a peer leaves."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.utils import get_dht_time

from dht.records import SwarmDHT
from dht.schemas import Manifest, PeerRecord, PeerState, stage_key
from core.types import LayerRange

pytestmark = pytest.mark.slow

LAYERS = LayerRange(start=0, end=2)


@pytest.fixture(params=[True, False], ids=["thread", "child-process"])
def two_nodes(request):
    """Two nodes, served on a thread of this process (the default) or in hivemind's child processes
    (``network.dht_process``): the records behave the same."""
    first = SwarmDHT.create("rec", host="127.0.0.1", in_process=request.param)
    second = SwarmDHT.create("rec", initial_peers=first.visible_maddrs(), host="127.0.0.1", in_process=request.param)
    yield first, second
    second.shutdown()
    first.shutdown()


def test_records_are_signed_schema_checked_and_withdrawn(two_nodes):
    first, second = two_nodes

    async def scenario():
        record = PeerRecord(peer_id=first.peer_id, stage=0, layers=LAYERS, state=PeerState.ONLINE, throughput=5.0)
        assert await first.announce(record)
        seen = await second.stage_records(0)

        # the second node tries to overwrite the first's entry under the first's subkey: refused
        forged = record.model_copy(update={"throughput": 1e9}).model_dump(mode="json")
        overwrite = await second.dht.store(stage_key("rec", 0), forged, get_dht_time() + 60,
                                           subkey=first._subkey(), return_future=True)
        after_forgery = await second.stage_records(0)

        # a value that is not a PeerRecord under a stage key: refused by the schema validator
        garbage = await second.dht.store(stage_key("rec", 0), {"peer_id": 3}, get_dht_time() + 60,
                                         subkey=second._subkey(), return_future=True)

        assert await first.withdraw(record)
        after_withdraw = await second.stage_records(0)
        return seen, overwrite, after_forgery, garbage, after_withdraw

    seen, overwrite, after_forgery, garbage, after_withdraw = asyncio.run(scenario())
    assert [(r.peer_id, r.throughput) for r in seen] == [(first.peer_id, 5.0)]
    assert not overwrite and [r.throughput for r in after_forgery] == [5.0]
    assert not garbage
    assert [r.state for r in after_withdraw] == [PeerState.OFFLINE]


def test_manifest_round_trip_and_newest_wins(two_nodes):
    first, second = two_nodes
    manifest = Manifest(run_id="rec", model="m", config_hash="h", num_layers=2, stages=[LAYERS])

    async def scenario():
        assert await second.get_manifest() is None
        assert await first.publish_manifest(manifest)
        return await second.wait_manifest(10)

    assert asyncio.run(scenario()) == manifest
