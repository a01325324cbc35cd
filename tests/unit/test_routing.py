"""Routing as a pure function, with tables (layer assignment tables are in test_shards_assignment)."""

from __future__ import annotations

from collections import Counter

import pytest

from dht.schemas import PeerRecord, PeerState
from peers.training.routing import coverage, expected_time, plan_route, plan_routes, record_loads
from core.types import LayerRange
from core.errors import NoRoute


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


def _timed(peer: str, stage: int, throughput: float, latency_ms: float | None = None, state=PeerState.ONLINE):
    return PeerRecord(peer_id=peer, stage=stage, layers=STAGES[stage], state=state, throughput=throughput,
                      latency_ms=latency_ms)


@pytest.mark.parametrize(
    "case, stage0, kwargs, expected",
    [
        ("fastest wins without other data", [_timed("a", 0, 100), _timed("b", 0, 50)], {}, "a"),
        ("a long queue sends work elsewhere", [_timed("a", 0, 100), _timed("b", 0, 50)],
         dict(queue={"a": 2}), "b"),
        ("observed latency counts", [_timed("a", 0, 100), _timed("b", 0, 50)],
         dict(tokens=10, latency_ms={"a": 500.0, "b": 10.0}), "b"),
        ("published latency when none observed", [_timed("a", 0, 100, 900.0), _timed("b", 0, 50, 1.0)],
         dict(tokens=10), "b"),
        ("observed beats published", [_timed("a", 0, 100, 900.0), _timed("b", 0, 50, 1.0)],
         dict(tokens=10, latency_ms={"a": 1.0}), "a"),
        ("draining peer is skipped", [_timed("a", 0, 100, state=PeerState.DRAINING), _timed("b", 0, 5)], {}, "b"),
        ("unmeasured peer is the last resort", [_timed("a", 0, 0), _timed("b", 0, 5)], {}, "b"),
    ],
)
def test_plan_route_by_expected_time(case, stage0, kwargs, expected):
    records = {0: stage0, 1: [_timed("z", 1, 10)]}
    assert plan_route(STAGES, records, **kwargs)[0].peer_id == expected, case


def test_expected_time_adds_round_trip_and_queued_work():
    record = _timed("a", 0, 200, latency_ms=50.0)
    assert expected_time(record, tokens=100) == pytest.approx(0.05 + 0.5)
    assert expected_time(record, tokens=100, queue=1, latency_ms=10.0) == pytest.approx(0.01 + 1.0)
    assert expected_time(_timed("b", 0, 0), tokens=1) == float("inf")


@pytest.mark.parametrize(
    "throughputs, count, expected",
    [
        ({"a": 10, "b": 10}, 4, {"a": 2, "b": 2}),
        ({"a": 20, "b": 10}, 6, {"a": 4, "b": 2}),
        ({"a": 10}, 3, {"a": 3}),
    ],
)
def test_plan_routes_spread_microbatches_by_speed(throughputs, count, expected):
    records = {0: [_timed(p, 0, t) for p, t in throughputs.items()], 1: [_timed("z", 1, 10)]}
    routes = plan_routes(STAGES, records, count)
    assert len(routes) == count
    assert Counter(route[0].peer_id for route in routes) == expected
    assert all(route[1].peer_id == "z" for route in routes)


def test_record_loads_sum_live_peers_once_and_leave_out_the_asker():
    records = {
        0: [_timed("a", 0, 10), _timed("b", 0, 5, state=PeerState.LOADING), _timed("c", 0, 7, state=PeerState.DRAINING)],
        1: [_timed("d", 1, 3), _timed("d", 1, 3), _timed("me", 1, 100), _timed("e", 1, 1, state=PeerState.OFFLINE)],
    }
    assert record_loads(3, records) == [15.0, 103.0, 0.0]
    assert record_loads(3, records, exclude="me") == [15.0, 3.0, 0.0]


@pytest.mark.parametrize(
    "records, expected",
    [
        # online on 0, claimed 1: counted on 1 only
        ({0: [_timed("a", 0, 10), _timed("m", 0, 4)], 1: [_timed("m", 1, 4, state=PeerState.LOADING)]}, [10.0, 4.0]),
        # a span peer moving from 0..1 to 1..2: its stage-1 record became the claim
        ({0: [_timed("s", 0, 5)], 1: [_timed("s", 1, 5, state=PeerState.LOADING)],
          2: [_record("s", 1, 5, state=PeerState.LOADING).model_copy(update={"stage": 2})]}, [0.0, 5.0, 5.0]),
        # a joining peer loading its span counts there; draining records never count
        ({0: [_timed("j", 0, 6, state=PeerState.LOADING), _timed("d", 0, 9, state=PeerState.DRAINING)],
          1: [_timed("j", 1, 6, state=PeerState.LOADING)]}, [6.0, 6.0]),
    ],
)
def test_record_loads_count_a_claimed_move_where_it_goes(records, expected):
    assert record_loads(3 if 2 in records else 2, records) == expected
