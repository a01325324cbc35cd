"""Peers serving several consecutive stages, over real hivemind DHT/P2P on loopback: 4 stages, 2 peers
with room for 2 stages each. Every stage is served, each peer holds a consecutive span with one record,
executor and averager per stage, training through them follows local training, and a replica joining
a span takes every stage's current state and averages with it per stage."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hivemind.utils import get_dht_time
from transformers import AutoModelForCausalLM

from dht.records import SwarmDHT
from dht.schemas import PeerState
from peers.training.client import StageClient
from net.transport import P2PTransport
from shards.placement import Span
from core.errors import WrongStage
from peers.telemetry.status import build_status

pytestmark = pytest.mark.slow

MODEL = dict(family="gpt2", num_layers=4, hidden_size=32, num_heads=4)
LR = 1e-2


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 8, (4, 12), generator=torch.Generator().manual_seed(step))


def _step(model, optimizer, ids: torch.Tensor) -> float:
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


def test_two_peers_serve_four_stages_in_spans_and_train_like_local(model_factory, swarm_factory):
    model_dir = model_factory(**MODEL)
    swarm = swarm_factory(model_dir, num_stages=4, num_peers=0, target_batch_size=4, lr=LR)
    first = swarm.add_peer(stage="0-1", rebalance=False)  # pinned to a range
    second = swarm.add_peer(max_stages=2, rebalance=False)  # placement: the only span that fills the swarm
    assert (first.span, second.span) == (Span(0, 2), Span(2, 2))
    assert first.claim_reason == "pinned with --stage"
    assert second.claim_reason.startswith("nobody served some of them; bottleneck 0 ->"), second.claim_reason
    for peer in (first, second):
        executors = [slot.service.executor for slot in peer.slots.values()]
        assert [e.stage for e in executors] == peer.stages
        assert len({id(e.optimizer) for e in executors}) == 2 and len({id(s.sync) for s in peer.slots.values()}) == 2
        # each stage's record carries half of the peer's one-stage throughput, as placement counts it
        assert [s.record.throughput for s in peer.slots.values()] == [peer.measurement.per_stage(2)] * 2
        assert peer.measurement.per_stage(2) == pytest.approx(peer.measurement.throughput / 2, abs=0.1)

    records = swarm.loop.run(first.dht.all_records(4), timeout=30)
    online = {stage: sorted(r.peer_id for r in rs if r.state == PeerState.ONLINE) for stage, rs in records.items()}
    assert online == {0: [first.peer_id], 1: [first.peer_id], 2: [second.peer_id], 3: [second.peer_id]}
    assert [records[s][0].layers.as_list() for s in range(4)] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    status = build_status(swarm.loop.run(first.dht.get_manifest(), timeout=30), records, [], now=0.0).model_dump()
    assert sorted((p["peer_id"], p["stages"]) for p in status["peers"]) == sorted(
        [(first.peer_id, [0, 1]), (second.peer_id, [2, 3])])
    assert [s["peers"] for s in status["stages"]] == [[first.peer_id]] * 2 + [[second.peer_id]] * 2

    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=0.01)
    with swarm.client() as remote:
        opt = torch.optim.AdamW(remote.parameters(), lr=LR, weight_decay=0.01)
        for step in range(3):
            ids = _batch(step)
            got, expected = _step(remote, opt, ids), _step(reference, ref_opt, ids)
            assert abs(got - expected) <= 1e-4, f"step {step}: swarm {got} vs local {expected}"
        assert [slot.service.executor.optimizer_step for p in (first, second) for slot in p.slots.values()] == [3] * 4

        # a replica joins the second peer's span mid-run: it downloads both stages' current state
        joined = swarm.add_peer(stage="2-3", rebalance=False)
        assert joined.stages == [2, 3] and all(s.record.state == PeerState.ONLINE for s in joined.slots.values())
        for stage in (2, 3):
            mine, theirs = joined.slots[stage].service.executor, second.slots[stage].service.executor
            assert mine.optimizer_step == theirs.optimizer_step == 3
            assert _max_diff(mine.module, theirs.module) == 0.0
        ids = _batch(3)
        got, expected = _step(remote, opt, ids), _step(reference, ref_opt, ids)
        assert abs(got - expected) <= 1e-4, f"after the join: swarm {got} vs local {expected}"
        # the new replica took part in the step (averaged per stage), or, when the step came before the
        # trainer's background read had its record, took the step from the others (``ResyncWatch``)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(joined.slots[stage].service.executor.optimizer_step != 4
                                                  for stage in (2, 3)):
            time.sleep(0.1)
        for stage in (2, 3):
            mine, theirs = joined.slots[stage].service.executor, second.slots[stage].service.executor
            assert mine.optimizer_step == theirs.optimizer_step == 4
            assert _max_diff(mine.module, theirs.module) <= 1e-5

    # over real P2P from a node of its own: a request for a stage the peer does not serve is refused by
    # name (the peer keeps serving), and two span peers given their two step calls in opposite orders
    # both average both stages (on one compute thread per peer they waited for each other until timeout)
    async def calls(dht: SwarmDHT):
        # a lost reply is retried, as the trainer's client does: a peer answers a repeated step call
        # from its record of the steps it applied
        client = StageClient(P2PTransport(await dht.dht.replicate_p2p()))
        try:
            with pytest.raises(WrongStage, match=r"serves stages 2\.\.3, not stage 0"):
                await client.forward(second.peer_id, 0, records[0][0].layers, "wrong",
                                     (torch.zeros(1, 2, 32), None, None), train=False)
            info = await client.info(second.peer_id, 3)
            members, when = sorted([second.peer_id, joined.peer_id]), get_dht_time() + 0.5
            first_calls = [client.step(second.peer_id, 3, records[3][0].layers, 4, members, when),
                           client.step(joined.peer_id, 2, records[2][0].layers, 4, members, when)]
            started = [asyncio.ensure_future(call) for call in first_calls]
            await asyncio.sleep(0.3)  # each peer's compute for one stage is under way before the other arrives
            then = [client.step(second.peer_id, 2, records[2][0].layers, 4, members, when),
                    client.step(joined.peer_id, 3, records[3][0].layers, 4, members, when)]
            return info, await asyncio.gather(*started, *then)
        finally:
            await client.transport.p2p.shutdown()

    dht = SwarmDHT.create_client("test", swarm.initial_peers)
    try:
        info, steps = swarm.loop.run(calls(dht), timeout=120)
    finally:
        dht.shutdown()
    assert (info.stage, info.optimizer_step) == (3, 4)
    assert [(r.step, r.optimizer_step, r.group_size) for r in steps] == [(4, 5, 2)] * 4
    for stage in (2, 3):
        mine, theirs = joined.slots[stage].service.executor, second.slots[stage].service.executor
        assert _max_diff(mine.module, theirs.module) <= 1e-5
