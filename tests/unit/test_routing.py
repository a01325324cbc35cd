"""Routing as a pure function, with tables (layer assignment tables are in test_shards_assignment)."""

from __future__ import annotations

import pytest

from dht.schemas import PeerRecord, PeerState
from peers.routing import coverage, plan_route
from shards.types import LayerRange
from swarm.errors import NoRoute


STAGES = [LayerRange(start=0, end=2), LayerRange(start=2, end=4)]


def _record(peer: str, stage: int, throughput: float = 10.0, state=PeerState.ONLINE, layers=None) -> PeerRecord:
    return PeerRecord(peer_id=peer, stage=stage, layers=layers or STAGES[stage], state=state, throughput=throughput)


@pytest.mark.parametrize(
    "records, banned, expected",
    [
        ({0: [_record("a", 0)], 1: [_record("b", 1)]}, (), ["a", "b"]),
        ({0: [_record("a", 0, 5), _record("c", 0, 50)], 1: [_record("b", 1)]}, (), ["c", "b"]),
        ({0: [_record("a", 0, 5), _record("c", 0, 50)], 1: [_record("b", 1)]}, ("c",), ["a", "b"]),
        ({0: [_record("a", 0), _record("x", 0, 99, PeerState.LOADING)], 1: [_record("b", 1)]}, (), ["a", "b"]),
    ],
)
def test_plan_route_picks_the_fastest_online_unbanned_peer(records, banned, expected):
    route = plan_route(STAGES, records, banned=banned)
    assert [hop.peer_id for hop in route] == expected
    assert [hop.layers for hop in route] == STAGES


@pytest.mark.parametrize(
    "records, message",
    [
        ({0: [_record("a", 0)]}, r"stage\(s\) 1 \[2, 4\)"),
        ({0: [_record("a", 0, state=PeerState.OFFLINE)], 1: [_record("b", 1)]}, r"stage\(s\) 0"),
        ({0: [_record("a", 0, layers=LayerRange(start=0, end=1))], 1: [_record("b", 1)]}, r"stage\(s\) 0"),
        ({}, r"stage\(s\) 0 \[0, 2\), 1 \[2, 4\)"),
    ],
)
def test_plan_route_names_the_stages_nobody_serves(records, message):
    with pytest.raises(NoRoute, match=message):
        plan_route(STAGES, records)


def test_coverage_counts_loading_and_online_peers():
    records = {0: [_record("a", 0), _record("b", 0, state=PeerState.LOADING)],
               1: [_record("c", 1, state=PeerState.OFFLINE)]}
    assert coverage(3, records) == [2, 0, 0]
