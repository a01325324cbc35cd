"""A peer that corrupts its outputs (the test-only ``peer.corrupt`` setting) in a real swarm: three
replicas of one stage over hivemind on loopback, a trainer spot-checking every forward. The liar is
caught within two spot checks and the catching trainer stops routing to it at once; its report is
signed in the DHT, and once a second reporter agrees (the quorum, ``dht.bans``) the peer is banned
run-wide and the bootstrap applies it (its ledger credit withheld, audited). The loss curve follows
local training step for step. On a keyed run only a key holder can report, one key holder alone
cannot get a peer banned (the framing attack), and two distinct key holders agreeing make the
bootstrap revoke the reported peer's key."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from dht.schemas import BanEvidence, BanReport
from dht.bans import all_reports, banned_peers, evidence_problem, report_ban
from dht.records import SwarmDHT
from core.types import LayerRange
from trainer.pipeline import FaultPolicy

pytestmark = pytest.mark.slow

STEPS = 6


def _batch(vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, min(vocab, 8), (4, 12), generator=torch.Generator().manual_seed(seed))


def _poll(read, timeout: float = 15.0):
    """``read()`` once it returns something (DHT reads on a busy loopback can miss a fresh value)."""
    deadline = time.monotonic() + timeout
    while not (found := read()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def test_a_corrupting_peer_is_caught_banned_for_everyone_and_the_loss_is_unaffected(model_factory, swarm_factory):
    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4)
    swarm = swarm_factory(model_dir, num_stages=1, num_peers=2, target_batch_size=4, lr=1e-3)
    liar = swarm.add_peer(stage=0, corrupt=0.05)  # passes every value check, only a recompute tells
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    with swarm.client(microbatch_size=1, policy=FaultPolicy(spot_check_rate=1.0)) as remote:
        settings = remote.manifest.optimizer

        def adamw(params):
            return torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas, eps=settings.eps,
                                     weight_decay=settings.weight_decay)

        optimizers = {"local": adamw(reference.parameters()), "swarm": adamw(remote.parameters())}
        losses: dict[str, list[float]] = {"local": [], "swarm": []}
        for step in range(STEPS):
            ids = _batch(reference.config.vocab_size, seed=step)
            for name, model in (("local", reference), ("swarm", remote)):
                loss = model(ids, labels=ids).loss
                loss.backward()
                optimizers[name].step()
                optimizers[name].zero_grad()
                losses[name].append(loss.item())
        checker = remote.pipeline.spot_check
    reports = _poll(lambda: swarm.loop.run(all_reports(swarm.bootstrap.dht), timeout=30))
    for step, (a, b) in enumerate(zip(losses["local"], losses["swarm"])):
        assert abs(a - b) / abs(a) <= 1e-3, f"step {step}: local {a} vs swarm {b}"
    assert [peer for peer, _ in checker.caught] == [liar.peer_id]
    assert checker.caught[0][1] <= 2, f"caught after {checker.caught[0][1]} spot checks of its work"
    print(f"caught after {checker.caught[0][1]} spot check(s) of its work, {checker.checks} made in all")
    assert [r.peer_id for r in reports] == [liar.peer_id] and "differs from two other replicas" in reports[0].reason
    evidence = reports[0].evidence  # what the check saw, signed by the trainer's own DHT key
    assert evidence is not None and evidence_problem(reports[0]) is None, reports[0]
    assert liar.peer_id not in (evidence.honest_peer, evidence.third_peer) and evidence.max_abs_diff > 0
    assert {evidence.honest_peer, evidence.third_peer} <= {p.peer_id for p in swarm.peers}
    book = swarm.bootstrap.telemetry.book
    # one reporter is no quorum: the trainer routed around the liar itself, the run has not banned it
    assert swarm.loop.run(banned_peers(swarm.bootstrap.dht), timeout=30) == {}
    assert swarm.loop.run(swarm.bootstrap.bans.check_once(), timeout=30) == [] and not book.banned

    second = SwarmDHT.create("test", initial_peers=swarm.initial_peers, host="127.0.0.1")  # another trainer
    try:
        agreed = reports[0].model_copy(update={"reporter": second.peer_id})
        assert swarm.loop.run(report_ban(second, agreed), timeout=30)
    finally:
        second.shutdown()

    def applied() -> set[str]:  # the bootstrap applies reports every metrics round; or now
        swarm.loop.run(swarm.bootstrap.bans.check_once(), timeout=30)
        return book.banned

    assert _poll(applied) == {liar.peer_id}
    assert liar.peer_id not in book.tally()
    assert set(swarm.loop.run(banned_peers(swarm.bootstrap.dht), timeout=30)) == {liar.peer_id}
    audit = swarm.bootstrap.db.audit_log()
    assert any(e.action == "peer.banned" and liar.peer_id in e.detail and "2 keys" in e.detail for e in audit)


def test_on_a_keyed_run_a_ban_needs_a_key_and_revokes_the_liars_key(model_factory, swarm_factory):
    """A ban report is token-gated like the stage records: a node without a run key cannot publish one.
    A trainer's report makes the bootstrap revoke the key the reported peer joined with (and only that
    key), which the run's gates and validators then enforce as for any revoked key."""
    swarm = swarm_factory(model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4), num_stages=1,
                          num_peers=0, target_batch_size=2, open=False)
    db = swarm.bootstrap.db
    honest_key, liar_key = db.create_key("honest", actor="test"), db.create_key("liar", actor="test")
    trainer_key = db.create_key("trainer", actor="test").secret
    honest = swarm.add_peer(stage=0, key=honest_key.secret)
    liar = swarm.add_peer(stage=0, key=liar_key.secret)
    stranger = SwarmDHT.create("test", initial_peers=swarm.initial_peers, host="127.0.0.1")
    evidence = BanEvidence(stage=0, layers=LayerRange(start=0, end=2), step=0, inputs="1" * 64,
                           accused_output="2" * 64, honest_output="3" * 64, third_output="3" * 64,
                           honest_peer=honest.peer_id, third_peer=stranger.peer_id, max_abs_diff=1.0)
    report = BanReport(peer_id=liar.peer_id, stage=0, reason="test: wrong outputs", reporter="t", evidence=evidence)
    try:
        assert swarm.loop.run(report_ban(stranger, report), timeout=30) is False  # no token: refused
    finally:
        stranger.shutdown()
    model = swarm.client(key=trainer_key)
    other = swarm.client(key=db.create_key("trainer 2", actor="test").secret)
    try:
        reporter = model.pipeline.spot_check._reporter_id
        # naming another reporter than itself is refused (issue 22: the audit blamed the named peer)
        model.loop.run(model.pipeline.spot_check._report(report), timeout=30)
        assert liar.peer_id not in swarm.loop.run(banned_peers(swarm.bootstrap.dht), timeout=30)
        own = report.model_copy(update={"reporter": reporter})
        model.loop.run(model.pipeline.spot_check._report(own), timeout=30)  # as a spot check reports it
        # the framing attack: one key holder reporting a peer (here an honest one) does not ban it
        assert _poll(lambda: swarm.loop.run(all_reports(swarm.bootstrap.dht), timeout=30))
        for _ in range(3):
            assert swarm.loop.run(swarm.bootstrap.bans.check_once(), timeout=30) == []
        assert all(k.revoked is None for k in db.list_keys())
        # a second, distinct key holder agrees: the run bans it
        second = report.model_copy(update={"reporter": other.pipeline.spot_check._reporter_id})
        other.loop.run(other.pipeline.spot_check._report(second), timeout=30)
    finally:
        model.close()
        other.close()

    def applied() -> bool:
        swarm.loop.run(swarm.bootstrap.bans.check_once(), timeout=30)
        return liar.peer_id in swarm.bootstrap.bans.handled

    assert _poll(applied)
    keys = {k.id: k for k in db.list_keys()}
    assert keys[liar_key.key.id].revoked is not None and keys[honest_key.key.id].revoked is None
    assert any(e.action == "key.revoke" and e.actor.startswith("ban:") and reporter in e.actor for e in db.audit_log())
