"""Placement decisions as tables: which span a joining peer claims, and when a serving peer moves."""

from __future__ import annotations

import math
import random

import pytest

from shards.placement import (
    Move,
    PlacedPeer,
    Span,
    bottleneck,
    choose_stages,
    contribution,
    should_move,
    spans_that_fit,
    stage_loads,
)
from core.errors import InsufficientMemory

GIB = 2**30


@pytest.mark.parametrize(
    "case, loads, compute, memory_stages, network, expected",
    [
        ("empty swarm, room for all", [0, 0, 0, 0], 100, 4, math.inf, Span(0, 4)),
        ("empty swarm, room for two", [0, 0, 0, 0], 100, 2, math.inf, Span(0, 2)),
        ("one hole", [10, 0, 10], 100, 1, math.inf, Span(1, 1)),
        ("one hole, room for all", [50, 0, 50], 30, 3, math.inf, Span(1, 1)),
        ("uneven peers", [30, 10, 20], 5, 1, math.inf, Span(1, 1)),
        ("two weak neighbours", [5, 5, 100, 100], 10, 2, math.inf, Span(0, 2)),
        ("holes at both ends", [0, 50, 0], 60, 3, math.inf, Span(0, 3)),
        ("network-bound peer spans wider", [0, 0, 0], 300, 3, 100, Span(0, 3)),
        ("bottleneck tied, lift the lowest", [10, 10, 40], 5, 2, math.inf, Span(0, 2)),
    ],
)
def test_choose_stages(case, loads, compute, memory_stages, network, expected):
    span = choose_stages(loads, [GIB] * len(loads), compute=compute, memory_bytes=memory_stages * GIB,
                         network=network)
    assert span == expected, case


def test_choose_stages_respects_memory_of_uneven_stages():
    # stage 0 is bigger (it took an extra layer): 2.5 GiB holds stages 1-2 but not 0-1
    span = choose_stages([0, 0, 0], [2 * GIB, GIB, GIB], compute=10, memory_bytes=int(2.5 * GIB))
    assert span == Span(1, 2)


def test_choose_stages_refuses_a_peer_without_memory_for_one_stage():
    with pytest.raises(InsufficientMemory, match=r"one stage needs 3.00 GiB .* this peer has 1.50 GiB free"):
        choose_stages([0, 0], [3 * GIB, 3 * GIB], compute=10, memory_bytes=int(1.5 * GIB))


def test_choose_stages_breaks_ties_with_rng_or_lowest_index():
    loads, sizes = [10, 10, 10], [GIB] * 3
    assert choose_stages(loads, sizes, compute=1, memory_bytes=GIB) == Span(0, 1)
    seen = {choose_stages(loads, sizes, compute=1, memory_bytes=GIB, rng=random.Random(seed)).start
            for seed in range(30)}
    assert seen == {0, 1, 2}


@pytest.mark.parametrize(
    "text, expected",
    [("2", Span(2, 1)), (3, Span(3, 1)), ("2-3", Span(2, 2)), (" 0 - 3 ", Span(0, 4)), ("4-4", Span(4, 1))],
)
def test_span_parse(text, expected):
    assert Span.parse(text) == expected
    assert Span.parse(str(expected.start) + "-" + str(expected.end)) == expected


@pytest.mark.parametrize(
    "text, message",
    [("3-2", "ends before it starts"), ("x", "not a stage or a range"), ("-1", "not a stage"), ("1-2-3", "not a stage"),
     ("", "not a stage")],
)
def test_span_parse_refuses(text, message):
    with pytest.raises(ValueError, match=message):
        Span.parse(text)


@pytest.mark.parametrize(
    "case, loads, me, memory_stages, expected",
    [
        ("balanced swarm stays", [100, 95], PlacedPeer("a", 50, Span(0)), 1, None),
        ("fill a hole", [20, 0], PlacedPeer("a", 10, Span(0)), 1, Move(Span(0), Span(1), 0, 10)),
        ("last peer of a stage stays", [10, 0.5], PlacedPeer("a", 10, Span(0)), 1, None),
        ("raise the bottleneck", [300, 100], PlacedPeer("a", 100, Span(0)), 1, Move(Span(0), Span(1), 100, 200)),
        ("a move that would lower it", [150, 100], PlacedPeer("a", 100, Span(0)), 1, None),
        ("most of the mover's throughput would pile up", [400, 100, 110], PlacedPeer("a", 100, Span(0)), 1, None),
        ("tied bottleneck: serve one", [30, 10, 10], PlacedPeer("a", 10, Span(0)), 1,
         Move(Span(0), Span(1), 10, 10)),
        ("cover a whole tie when memory allows", [30, 10, 10], PlacedPeer("a", 10, Span(0)), 2,
         Move(Span(0), Span(1, 2), 10, 15)),
        ("already best", [10, 30], PlacedPeer("a", 10, Span(0)), 1, None),
    ],
)
def test_should_move(case, loads, me, memory_stages, expected):
    move = should_move(loads, [GIB] * len(loads), me, memory_bytes=memory_stages * GIB)
    assert move == expected, case


def test_margin_is_configurable():
    loads, me = [128, 100], PlacedPeer("a", 10, Span(0))  # imbalance 1.14: at the default margin, stay
    assert should_move(loads, [GIB] * 2, me, memory_bytes=GIB) is None
    assert should_move(loads, [GIB] * 2, me, memory_bytes=GIB, margin=0.1) == Move(Span(0), Span(1), 100, 110)


def test_move_gain_is_infinite_for_a_hole_and_relative_otherwise():
    assert Move(Span(0), Span(1), 0, 5).gain == math.inf
    assert Move(Span(0), Span(1), 100, 130).gain == pytest.approx(0.3)


def _potential(loads) -> tuple[float, int]:
    low = bottleneck(loads)
    return round(low, 6), -int(sum(value <= low + 1e-6 for value in loads))


@pytest.mark.parametrize("seed", range(5))
def test_repeated_moves_settle_without_flapping(seed):
    """Every peer re-evaluates in turn until nobody moves: each move raises (bottleneck, -stages at it),
    so no placement comes back and the loop ends; the result is balanced within the margin or stuck
    only where no single move helps."""
    rng = random.Random(seed)
    num_stages, sizes = 6, [GIB] * 6
    peers = [PlacedPeer(f"p{i}", rng.choice([1, 5, 30, 100]), Span(rng.randrange(2))) for i in range(30)]
    start = bottleneck(stage_loads(num_stages, peers))
    assert start == 0  # stages 2..5 start empty
    moves = 0
    for _ in range(200):
        moved = False
        for i, peer in enumerate(peers):
            loads = stage_loads(num_stages, peers)
            move = should_move(loads, sizes, peer, memory_bytes=GIB, margin=0.05)
            if move is not None:
                peers[i] = PlacedPeer(peer.peer_id, peer.compute, move.new)
                assert _potential(stage_loads(num_stages, peers)) > _potential(loads)
                moved, moves = True, moves + 1
        if not moved:
            break
    else:
        pytest.fail("placement never settled")
    loads = stage_loads(num_stages, peers)
    assert bottleneck(loads) > 0 and moves >= 4
    for peer in peers:  # settled: nobody wants to move any more
        assert should_move(loads, sizes, peer, memory_bytes=GIB, margin=0.05) is None


def test_spans_that_fit_and_contribution():
    assert spans_that_fit([GIB] * 5, 3 * GIB) == 3
    assert spans_that_fit([GIB] * 5, 100 * GIB) == 5
    assert contribution(100, 4) == 25
    assert contribution(100, 4, network=10) == 10
    loads = stage_loads(3, [PlacedPeer("a", 30, Span(0, 3)), PlacedPeer("b", 5, Span(1))])
    assert loads.tolist() == [10, 15, 10]


# -- replicas cost an averaging round every step (issue 21) ---------------------------------------

from shards.placement import Joiner, ReplicaCost, effective_loads, plan_joiners  # noqa: E402

# the tiny model of the issue: 2 stages of ~1.3 MB of parameters, batch 8 x 128, loopback links
LOOPBACK = ReplicaCost(step_tokens=1024, round_seconds=0.5, param_bytes=(1.3e6, 1.3e6), bandwidth=2e8)
FOUR = ReplicaCost(step_tokens=1024, round_seconds=0.5, param_bytes=(1e6,) * 4, bandwidth=2e8)


def _joiners(*computes: float, memory_stages: int = 8) -> list[Joiner]:
    return [Joiner(f"peer{i}", c, memory_stages * GIB) for i, c in enumerate(computes)]


def test_effective_loads_pay_the_round_only_with_replicas():
    cost = ReplicaCost(step_tokens=1024, round_seconds=0.5, param_bytes=(1.3e6,) * 3, bandwidth=2e8)
    eff = effective_loads([10_000, 10_000, 0], [1, 2, 0], cost)
    assert eff[0] == 10_000  # one replica: nothing to average
    step = 1024 / 10_000 + 0.5 + 2 * 0.5 * 1.3e6 / 2e8
    assert eff[1] == pytest.approx(1024 / step)
    assert eff[2] == 0
    assert list(effective_loads([5, 6], [3, 3], None)) == [5, 6]  # no cost: the loads as they are


@pytest.mark.parametrize(
    "case, loads, replicas, computes, memory_stages, cost, expected",
    [
        ("two peers at once split the pipeline", [0, 0], [0, 0], [10_000, 10_000], 8, LOOPBACK,
         [Span(0, 1), Span(1, 1)]),
        ("four peers at once: two replicas per stage", [0, 0], [0, 0], [10_000] * 4, 8, LOOPBACK,
         [Span(0, 1), Span(1, 1), Span(0, 1), Span(1, 1)]),
        ("two peers, four stages: two stages each", [0] * 4, [0] * 4, [10_000, 10_000], 8, FOUR,
         [Span(2, 2), Span(0, 2)]),
        ("memory for half the model: each takes the half it can", [0, 0], [0, 0], [10_000, 10_000], 1, LOOPBACK,
         [Span(0, 1), Span(1, 1)]),
        ("without a replica cost the first takes all (the old rule)", [0, 0], [0, 0], [10_000, 10_000], 8, None,
         [Span(0, 2), Span(0, 2)]),
        ("a fast and a slow peer: the fast one is placed first", [0, 0], [0, 0], [20_000, 5_000], 8, LOOPBACK,
         [Span(0, 1), Span(1, 1)]),
    ],
)
def test_plan_joiners(case, loads, replicas, computes, memory_stages, cost, expected):
    joiners = _joiners(*computes, memory_stages=memory_stages)
    plan = plan_joiners(loads, replicas, joiners, [GIB] * len(loads), cost=cost)
    assert [plan[j.peer_id] for j in joiners] == expected, case


def test_plan_joiners_is_the_same_whatever_order_the_group_is_seen_in():
    joiners = _joiners(10_000, 10_000, 8_000, 12_000)
    plans = {tuple(sorted(plan_joiners([0, 0], [0, 0], order, [GIB, GIB], cost=LOOPBACK).items()))
             for order in (joiners, joiners[::-1], joiners[1:] + joiners[:1])}
    assert len(plans) == 1


def test_plan_joiners_leaves_out_a_peer_without_memory_for_one_stage():
    joiners = [Joiner("big", 10_000, 8 * GIB), Joiner("tiny", 10_000, GIB // 2)]
    assert plan_joiners([0, 0], [0, 0], joiners, [GIB, GIB], cost=LOOPBACK) == {"big": Span(0, 2)}


@pytest.mark.parametrize(
    "case, loads, replicas, me, expected",
    [
        ("both hold the whole model: dropping a stage is free and ends the averaging of it",
         [10_000, 10_000], [2, 2], PlacedPeer("a", 10_000, Span(0, 2)), Span(0, 1)),
        ("the other peer took stage 1 alone: keep stage 0 only", [5_000, 15_000], [1, 2],
         PlacedPeer("a", 10_000, Span(0, 2)), Span(0, 1)),
        ("the only replica of stage 1 never drops it", [15_000, 5_000], [2, 1],
         PlacedPeer("a", 10_000, Span(0, 2)), Span(1, 1)),
        ("split already: stay", [10_000, 10_000], [1, 1], PlacedPeer("a", 10_000, Span(0, 1)), None),
    ],
)
def test_should_move_drops_stages_of_its_own_span_when_that_trains_faster(case, loads, replicas, me, expected):
    move = should_move(loads, [GIB, GIB], me, memory_bytes=8 * GIB, replicas=replicas, cost=LOOPBACK)
    assert (move.new if move is not None else None) == expected, case


def test_should_move_fills_an_empty_stage_from_an_over_replicated_one():
    move = should_move([30_000, 0], [GIB, GIB], PlacedPeer("a", 10_000, Span(0, 1)), memory_bytes=GIB,
                       replicas=[3, 0], cost=LOOPBACK)
    assert move is not None and move.new == Span(1, 1) and move.bottleneck_before == 0


def test_plan_joiners_covers_the_empty_stage_of_a_running_swarm():
    joiners = _joiners(10_000, 10_000)
    plan = plan_joiners([10_000, 0], [1, 0], joiners, [GIB, GIB], cost=LOOPBACK)
    assert any(1 in span.stages for span in plan.values())
