"""Delegation over real hivemind DHT and P2P on loopback: a delegate serves a weak machine's stage,
the weak machine signs the receipts and the bootstrap credits it; sessions end by capacity, expiry,
revocation; a forged receipt is refused; a delegate killed mid-training costs no step."""

from __future__ import annotations

import os
import signal
import time
from typing import Callable

import pytest
import torch

from delegation.client import DelegationClient
from delegation.protocol import SessionState
from dht.records import SwarmDHT
from peers.accounting.ledger import LEDGER_SUBMIT, LedgerWriter, SubmitRequest, SubmitResponse, Work
from net.rpc import parse_reply
from net.transport import P2PTransport
from core.errors import AuthRejected, CapacityExceeded, UnknownSession
from trainer.pipeline import FaultPolicy
from peers.telemetry.status import collect_status
from tests.helpers import reference_losses

pytestmark = pytest.mark.slow

MODEL = dict(family="llama", num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2)
POLICY = FaultPolicy(averaging_window=0.3)
TOKEN = "delegation-token-for-tests-0123456789"
FAST = {"poll_interval": 0.5}
TOKENS_PER_PASS = 4 * 12  # a batch of 4 sequences of 12 tokens, one microbatch


def _wait(condition: Callable[[], object], *, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 8, (4, 12), generator=torch.Generator().manual_seed(step))


def _train(model, steps: int, *, after_step: Callable[[int], None] = lambda step: None) -> list[float]:
    optimizer = model.create_optimizer()
    losses = []
    for step in range(steps):
        ids = _batch(step)
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert optimizer.step(), f"step {step} did not close"
        optimizer.zero_grad()
        losses.append(loss.item())
        after_step(step)
    return losses


def test_a_delegated_stage_trains_like_the_same_run_without_delegation(model_factory, swarm_factory):
    """Run A: two peers, one per stage. Run B: a delegate serves stage 0 itself and stage 1 for a
    weak machine. Same losses; the weak machine is credited for stage 1 (signed by it, delegate
    noted), the delegate's own ledger holds only stage 0; status on both sides and in `swarm status`."""
    model_dir = model_factory(**MODEL)
    steps = 3
    plain = swarm_factory(model_dir, num_stages=2, num_peers=2, target_batch_size=4, lr=1e-2)
    with plain.client(policy=POLICY) as model:
        expected = _train(model, steps)
    plain.stop()

    swarm = swarm_factory(model_dir, num_stages=2, num_peers=0, target_batch_size=4, lr=1e-2)
    delegate = swarm.add_peer(stage=0, delegation={"accept": True, "tokens": [TOKEN]})
    sessions = swarm.accept_delegations(delegate)
    weak = swarm.add_delegator([delegate], TOKEN, stage=1, **FAST)
    _wait(lambda: weak.status().state == SessionState.ACTIVE, what="the delegated stage to be served")
    with swarm.client(policy=POLICY) as model:
        losses = _train(model, steps)
    assert losses == pytest.approx(expected, rel=1e-5, abs=1e-6)

    hosted = delegate.hosted[1].service.executor
    assert hosted.optimizer_step == delegate.slots[0].service.executor.optimizer_step == steps
    work = 2 * TOKENS_PER_PASS * steps  # a forward and a backward per step
    book = swarm.bootstrap.telemetry.book
    _wait(lambda: book.tally().get(weak.peer_id, {}).get("tokens") == work, what="the delegator's ledger entries")
    assert book.delegates() == {weak.peer_id: {delegate.peer_id: work}}
    assert {entry.stage for entry in delegate.telemetry.recorder.cut()} == {0}, "the delegate credits only its own stage"

    status = sessions.status()
    assert (status.total_sessions, status.active_sessions, status.max_sessions) == (1, 1, 10)
    session = status.sessions[0]
    assert (session.delegator, session.stage, session.status, session.tokens) == (weak.peer_id, 1, "active", work)
    assert session.microbatches == steps and session.age_s > 0
    mine = weak.status()
    assert mine.delegation_mode and mine.delegate_reachable and mine.delegate == delegate.peer_id
    assert mine.gpu_count == 0 and mine.receipts == 2 * steps
    report = swarm.loop.run(collect_status(swarm.bootstrap.dht)).model_dump(mode="json")
    assert report["delegations"] == [{"delegate": delegate.peer_id, "delegator": weak.peer_id, "stage": 1,
                                      "gpu_count": 0}]

    swarm.loop.run(weak.stop(), timeout=60)
    assert delegate.hosted == {} and sessions.status().sessions[0].status == SessionState.STOPPED


def test_capacity_expiry_tokens_and_forged_receipts(model_factory, swarm_factory, tmp_path):
    """One session at most: a second delegator gets a capacity error. A delegator that dies stops
    polling: its session expires after the (short) TTL and the stage is freed. A bad token is refused,
    a revoked one ends its session. Receipts signed by the delegate as the delegator's are refused."""
    model_dir = model_factory(**MODEL)
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"{TOKEN}\nsecond-token\n")
    swarm = swarm_factory(model_dir, num_stages=2, num_peers=0)
    delegate = swarm.add_peer(stage=0, delegation={"accept": True, "tokens_file": str(tokens_file),
                                                   "max_sessions": 1, "session_ttl": 3.0})
    sessions = swarm.accept_delegations(delegate)
    weak = swarm.add_delegator([delegate], TOKEN, stage=1, **FAST)
    _wait(lambda: weak.status().state == SessionState.ACTIVE, what="the delegated stage to be served")

    other = swarm.loop.run(_node(swarm))
    try:
        client = DelegationClient(other[1], delegate.peer_id, attempts=1)
        with pytest.raises(AuthRejected, match="does not accept that delegation token"):
            swarm.loop.run(client.start("wrong-token", other[0].peer_id))
        with pytest.raises(CapacityExceeded, match="1 of 1 sessions"):
            swarm.loop.run(client.start("second-token", other[0].peer_id))
        with pytest.raises(UnknownSession, match="never issued"):
            swarm.loop.run(client.poll("0" * 32, 0))

        # the delegate forges receipts as the delegator's, signed with its own key: the bootstrap refuses
        forger = LedgerWriter(tmp_path / "forged.jsonl", key=delegate.dht.signing_key, run_id=swarm.run_id,
                              peer_id=weak.peer_id)
        entry = forger.append(1, Work(microbatches=5, tokens=500), 0, 0.0, 1.0, delegate=delegate.peer_id)
        message = SubmitRequest(entries=[entry])
        reply, _ = swarm.loop.run(delegate._transport.call(swarm.bootstrap.dht.peer_id, LEDGER_SUBMIT, message, [],
                                                           timeout=10))
        with pytest.raises(AuthRejected, match="submits only its own ledger"):
            parse_reply(SubmitResponse, reply)
        assert weak.peer_id not in swarm.bootstrap.telemetry.book.tally()

        # the delegator dies (its p2pd killed, nothing stopped): the session expires, the stage is freed
        first = sessions.status().sessions[0].session_id
        swarm.loop.run(_cancel_polls(weak))
        os.kill(weak.dht.dht.daemon_pid, signal.SIGKILL)
        _wait(lambda: not delegate.hosted, timeout=20, what="the session to expire")
        assert sessions.status().sessions[0].status == SessionState.EXPIRED

        # a session on the second token, then that token revoked: the session ends within a sweep
        started = swarm.loop.run(client.start("second-token", other[0].peer_id))
        _wait(lambda: 1 in delegate.hosted and delegate.hosted[1].service is not None, what="the second session")
        swarm.loop.run(client.poll(started.session_id, 0))
        tokens_file.write_text(f"{TOKEN}\n")
        _wait(lambda: not delegate.hosted, timeout=10, what="the revoked session to end")
        with pytest.raises(UnknownSession, match="token was revoked"):
            swarm.loop.run(client.poll(started.session_id, 0))
        ended = {s.session_id: s.status for s in sessions.status().sessions}
        assert ended == {first: SessionState.EXPIRED, started.session_id: SessionState.REVOKED}
    finally:
        swarm.loop.run(_close_node(other))


async def _node(swarm) -> tuple[SwarmDHT, P2PTransport]:
    import asyncio

    dht = await asyncio.to_thread(SwarmDHT.create_client, swarm.run_id, swarm.initial_peers)
    return dht, P2PTransport(await dht.dht.replicate_p2p())


async def _close_node(node: tuple[SwarmDHT, P2PTransport]) -> None:
    import asyncio

    dht, transport = node
    await transport.p2p.shutdown()
    await asyncio.to_thread(dht.shutdown)


async def _cancel_polls(delegator) -> None:
    from core.loop import cancel_and_wait

    await cancel_and_wait(delegator._task)


def test_a_delegate_killed_mid_training_costs_no_step_and_the_delegator_moves_on(model_factory, swarm_factory):
    """Stage 0: peers A and D; stage 1: peer B, and D serving it for a weak machine whose second
    delegate is A. D's DHT and p2pd are killed after step 2: the trainer routes around it (every step
    closes, losses follow local training); the weak machine reports delegation_mode with its delegate
    unreachable (A does not accept delegations yet), and resumes on A once A accepts them (after step
    3, so A loads stage 1, averager process and all, while the trainer's calls stream through it)."""
    model_dir = model_factory(**MODEL)
    steps = 6
    swarm = swarm_factory(model_dir, num_stages=2, num_peers=2, target_batch_size=4, lr=1e-2)
    first, _ = swarm.peers
    doomed = swarm.add_peer(stage=0, delegation={"accept": True, "tokens": [TOKEN]})
    swarm.accept_delegations(doomed)
    weak = swarm.add_delegator([doomed, first], TOKEN, stage=1, **FAST)
    _wait(lambda: weak.status().state == SessionState.ACTIVE, what="the delegated stage to be served")
    seen: dict = {}

    def kill_after(step: int) -> None:
        if step == 1:
            os.kill(doomed.dht.dht.daemon_pid, signal.SIGKILL)  # its p2p side dies, nothing stopped
            _wait(lambda: not weak.status().delegate_reachable, timeout=30, what="the delegator to notice")
            seen["status"] = weak.status()
        if step == 2:  # A's owner now accepts delegations: A loads stage 1 while it serves the trainer
            seen["sessions"] = swarm.accept_delegations(first, accept=True, tokens=[TOKEN])

    with swarm.client(policy=POLICY) as model:
        losses = _train(model, steps, after_step=kill_after)
        assert model.step == steps
    assert losses == pytest.approx(reference_losses(model_dir, [_batch(s) for s in range(steps)], lr=1e-2), rel=1e-3)
    down = seen["status"]
    assert down.delegation_mode and not down.delegate_reachable and "unreachable" in down.last_error

    sessions = seen["sessions"]
    _wait(lambda: weak.status().delegate == first.peer_id and weak.status().state == SessionState.ACTIVE,
          timeout=60, what="the delegator to resume on the second delegate")
    assert weak.status().delegate_reachable and 1 in first.hosted
    assert sessions.status().sessions[0].delegator == weak.peer_id
    with swarm.client(policy=POLICY) as model:
        _train(model, 1)  # the resumed replica trains with the others
    assert first.hosted[1].service.executor.optimizer_step == swarm.peers[1].service.executor.optimizer_step
    swarm.peers.remove(doomed)
    swarm.loop.run(doomed.stop(final_checkpoint=False), timeout=60)


def test_a_keyed_run_accepts_the_delegators_signed_record_and_routes_to_the_delegate(model_factory, swarm_factory):
    """On a keyed run the delegator needs a key of its own; its record of the delegated stage carries
    its token and is signed by it, so the DHT's token validator accepts it and trainers route to the
    delegate through it (no other peer serves stage 1)."""
    model_dir = model_factory(**MODEL)
    swarm = swarm_factory(model_dir, num_stages=2, num_peers=0, target_batch_size=4, lr=1e-2, open=False)
    key = swarm.bootstrap.db.create_key("volunteers", actor="test").secret
    delegate = swarm.add_peer(stage=0, key=key, delegation={"accept": True, "tokens": [TOKEN]})
    swarm.accept_delegations(delegate)
    with pytest.raises(AuthRejected, match="needs an API key"):
        swarm.add_delegator([delegate], TOKEN, stage=1, **FAST)
    swarm.delegators.clear()  # it failed and stopped itself
    weak = swarm.add_delegator([delegate], TOKEN, key=key, stage=1, **FAST)
    _wait(lambda: weak.status().state == SessionState.ACTIVE, what="the delegated stage to be served")
    records = swarm.loop.run(swarm.bootstrap.dht.stage_records(1))
    assert [(r.peer_id, r.delegate_of, bool(r.access_token)) for r in records] == [(delegate.peer_id, weak.peer_id, True)]
    with swarm.client(policy=POLICY, key=key) as model:
        losses = _train(model, 2)
    assert losses == pytest.approx(reference_losses(model_dir, [_batch(s) for s in range(2)], lr=1e-2), rel=1e-3)
    assert delegate.hosted[1].service.executor.optimizer_step == 2
