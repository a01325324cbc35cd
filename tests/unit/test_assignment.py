"""Pure decisions, as tables: cutting layers into stages, claiming a stage, planning a route."""

from __future__ import annotations

import random

import pytest

from dht.schemas import PeerRecord, PeerState
from peers.routing import coverage, plan_route
from shards.assignment import choose_stage, stage_boundaries
from shards.types import LayerRange
from swarm.errors import NoRoute


@pytest.mark.parametrize(
    "layers, stages, expected",
    [
        (6, 3, [(0, 2), (2, 4), (4, 6)]),
        (7, 3, [(0, 3), (3, 5), (5, 7)]),
        (4, 1, [(0, 4)]),
        (3, 3, [(0, 1), (1, 2), (2, 3)]),
        (80, 6, [(0, 14), (14, 28), (28, 41), (41, 54), (54, 67), (67, 80)]),
    ],
)
def test_stage_boundaries(layers, stages, expected):
    assert [(r.start, r.end) for r in stage_boundaries(layers, stages)] == expected


@pytest.mark.parametrize("layers, stages, message", [(3, 4, "cannot cut 3 layers into 4"), (3, 0, "at least 1")])
def test_stage_boundaries_refuses(layers, stages, message):
    with pytest.raises(ValueError, match=message):
        stage_boundaries(layers, stages)


@pytest.mark.parametrize(
    "cover, expected",
    [([0, 0, 0], 0), ([1, 0, 1], 1), ([2, 1, 1], 1), ([1, 1, 0], 2), ([5], 0)],
)
def test_choose_stage_least_covered(cover, expected):
    assert choose_stage(cover) == expected


def test_choose_stage_breaks_ties_at_random_among_the_least_covered():
    picks = {choose_stage([1, 0, 3, 0], rng=random.Random(seed)) for seed in range(50)}
    assert picks == {1, 3}


def test_choose_stage_refuses_no_stages():
    with pytest.raises(ValueError, match="no stages"):
        choose_stage([])


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
