"""Rebalancing on real peers (hivemind DHT + P2P on loopback): 4 peers, 2 stages, one peer slowed
down by ``peer.slowdown``. They start badly placed (three fast peers on stage 0, the slow one alone on
stage 1, the bottleneck); once let loose, a fast peer moves to stage 1 by itself. Training throughput
before and after is logged (not asserted: timings on this machine are noise). A second test moves a
peer's whole span: it leaves one stage for the two weakest.

The flake this test had (2 failures in 8 runs here): the fast peers measured themselves on this shared
machine and came out up to 2.5x apart (16,969 / 16,862 / 41,531 tokens/s in one run); placement then
rightly made follow-up moves (the slow peer joining stage 0 for a 0.6% gain; a third move) that the
assertions forbid. They now announce one throughput (``peer.throughput``). With equal gains, two of them
then often claimed stage 1 at the same moment, and both moved: each still counted the other on stage 0
while it claimed stage 1, so the move still looked worth it. ``record_loads`` now counts a claim where
it goes, and they back off as designed."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from dht.schemas import PeerState
from peers.training.routing import record_loads
from shards.placement import Span

pytestmark = pytest.mark.slow

logger = logging.getLogger(__name__)

PERIOD = 3.0  # short for the test, long enough that a claim shows in the DHT before others check
FAST = dict(rebalance=False, rebalance_period=PERIOD, drain_seconds=1.0, throughput=20_000.0, max_stages=1)
SLOW = dict(FAST, slowdown=0.5, throughput=None)  # measured: the delay makes it < 300 tokens/s


def _train_tokens_per_second(swarm, steps: int = 3) -> float:
    ids = torch.randint(0, 8, (4, 16), generator=torch.Generator().manual_seed(0))
    with swarm.client() as model:
        model(ids, labels=ids).loss.backward()  # warm-up: route, connections
        started = time.perf_counter()
        for _ in range(steps):
            model(ids, labels=ids).loss.backward()
        return steps * ids.numel() / (time.perf_counter() - started)


def _loads(swarm) -> list[float]:
    peer = swarm.peers[0]
    records = swarm.loop.run(peer.dht.all_records(2), timeout=30)
    return record_loads(2, records)


def test_a_fast_peer_moves_to_the_bottleneck_stage(model_factory, swarm_factory):
    model_dir = model_factory("gpt2", num_layers=4, hidden_size=32)
    swarm = swarm_factory(model_dir, num_stages=2, num_peers=0, target_batch_size=10_000)
    slow = swarm.add_peer(stage=1, **SLOW)
    fast = [swarm.add_peer(stage=0, **FAST) for _ in range(3)]
    assert slow.record.throughput < min(p.record.throughput for p in fast) / 10
    assert {p.record.throughput for p in fast} == {20_000.0}

    before = _loads(swarm)
    assert before[1] < before[0]  # stage 1 is the bottleneck
    speed_before = _train_tokens_per_second(swarm)

    for peer in swarm.peers:
        swarm.loop.run(_start_rebalancing(peer), timeout=10)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        moved = [p for p in fast if p.moves and p.record.state == PeerState.ONLINE]
        if moved and all(p.record.state == PeerState.ONLINE for p in swarm.peers):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no fast peer moved within 90 s: {[p.record.stage for p in swarm.peers]}")

    time.sleep(2 * PERIOD)  # let any follow-up move finish; then a quiet round: nobody moves any more
    settled = sum(len(p.moves) for p in swarm.peers)
    time.sleep(2 * PERIOD)
    assert sum(len(p.moves) for p in swarm.peers) == settled, "peers kept moving (flapping)"
    assert all(p.record.state == PeerState.ONLINE for p in swarm.peers)

    stages = {id(p): p.record.stage for p in swarm.peers}
    # exactly one fast peer goes to stage 1 (a second one would leave stage 0 with less than stage 1
    # had); nobody else moves
    assert [stages[id(p)] for p in fast].count(1) == 1
    assert stages[id(slow)] == 1 and not slow.moves
    assert sorted(len(p.moves) for p in fast) == [0, 0, 1]
    for peer in fast:
        for move in peer.moves:
            assert (move.old.start, move.new.start) == (0, 1)
            assert move.bottleneck_after > move.bottleneck_before
    mover = next(p for p in fast if p.moves)

    after = _loads(swarm)
    assert min(after) > 2 * min(before)
    records = swarm.loop.run(mover.dht.all_records(2), timeout=30)
    assert {r.state for r in records[0] if r.peer_id == mover.peer_id} <= {PeerState.OFFLINE}
    assert any(r.peer_id == mover.peer_id and r.state == PeerState.ONLINE for r in records[1])

    speed_after = _train_tokens_per_second(swarm)
    logger.warning("placement: bottleneck %.0f -> %.0f tokens/s (DHT records); training %.0f -> %.0f tokens/s",
                   min(before), min(after), speed_before, speed_after)
    print(f"bottleneck {min(before):.0f} -> {min(after):.0f} tokens/s; "
          f"training throughput before {speed_before:.0f} tokens/s, after {speed_after:.0f} tokens/s")


async def _start_rebalancing(peer) -> None:
    peer.start_rebalancing()


def test_a_peer_moves_its_span_to_cover_the_two_weakest_stages(model_factory, swarm_factory):
    """3 stages: three fast peers on stage 0, a slow peer alone on each of stages 1 and 2. The one fast
    peer let loose (room for 2 stages) leaves stage 0 for stages 1..2: both bottleneck stages gain half
    its throughput, more than either would alone. Its old record goes offline, a record per new stage
    comes online with half its throughput, and both new stages serve training."""
    model_dir = model_factory("gpt2", num_layers=3, hidden_size=32)
    swarm = swarm_factory(model_dir, num_stages=3, num_peers=0, target_batch_size=10_000)
    slow = [swarm.add_peer(stage=stage, **SLOW) for stage in (1, 2)]
    mover = swarm.add_peer(stage=0, **dict(FAST, max_stages=2))
    fast = [mover] + [swarm.add_peer(stage=0, **FAST) for _ in range(2)]
    before = swarm.loop.run(mover.dht.all_records(3), timeout=30)
    assert min(record_loads(3, before)) < 1_000

    swarm.loop.run(_start_rebalancing(mover), timeout=10)
    deadline = time.monotonic() + 60
    while not (mover.moves and all(s.record.state == PeerState.ONLINE for s in mover.slots.values())):
        if time.monotonic() > deadline:
            pytest.fail(f"the peer did not move its span within 60 s: serves {mover.span}")
        time.sleep(0.5)
    [move] = mover.moves
    assert (move.old, move.new) == (Span(0, 1), Span(1, 2))
    assert move.bottleneck_after > move.bottleneck_before + 5_000  # each stage gained half of 20,000
    assert mover.stages == [1, 2] and [s.record.throughput for s in mover.slots.values()] == [10_000.0] * 2
    assert [s.service.executor.stage for s in mover.slots.values()] == [1, 2]

    records = swarm.loop.run(mover.dht.all_records(3), timeout=30)
    assert {r.state for r in records[0] if r.peer_id == mover.peer_id} <= {PeerState.OFFLINE}
    for stage in (1, 2):
        assert [r.state for r in records[stage] if r.peer_id == mover.peer_id] == [PeerState.ONLINE]
    loads = record_loads(3, records)
    assert loads[0] == 40_000.0 and min(loads[1:]) > 10_000.0

    work: list = []  # the forwards and backwards the mover serves from now on (not info calls: the
    # other peers' probes and resync checks may ask it any time)
    mover.telemetry.activity.listeners.append(
        lambda done: work.append((done.stage, done.method)) if done.ok and done.method in ("forward", "backward")
        else None)
    with swarm.client() as model:  # forward and backward through a route that may use the moved span
        ids = torch.randint(0, 8, (2, 8), generator=torch.Generator().manual_seed(0))
        loss = model(ids, labels=ids).loss
        loss.backward()
    assert torch.isfinite(loss)
    # the fastest replica of stages 1 and 2 is the moved span: it took the forward and the backward
    assert sorted(work) == [(1, "backward"), (1, "forward"), (2, "backward"), (2, "forward")]
    assert all(p.record.state == PeerState.ONLINE for p in fast[1:] + slow)
