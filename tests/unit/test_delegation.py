"""Delegation sessions over the in-memory transport: tokens, capacity, expiry, revocation, receipts,
and the ledger rules that credit a delegator (and only it) for its delegate's work."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from bootstrap.ledger import LedgerBook
from delegation.client import DelegationClient
from delegation.delegator import receipts_digest
from delegation.protocol import Receipt, SessionState
from delegation.service import DelegationService
from delegation.sessions import DelegateSessions, TokenSet, tensor_digest
from dht.schemas import PeerRecord, PeerState
from peers.accounting.ledger import LedgerEntry, LedgerWriter, Work, delegated_tally, tally, verify_chain
from peers.training.protocol import BACKWARD, FORWARD, BackwardRequest, ForwardRequest
from net.transport import InMemoryTransport
from core.types import LayerRange
from core.errors import AuthRejected, CapacityExceeded, DelegationRefused, UnknownSession

DELEGATE = "QmDelegate"
TOKEN = "tok-" + "x" * 40


class FakeHost:
    """A delegate's peer as ``DelegateSessions`` sees it: 12 stages, stage 0 served by itself."""

    peer_id = DELEGATE

    def __init__(self) -> None:
        self.hosted: dict[int, tuple[str, object]] = {}
        self.released: list[int] = []
        self.loaded = asyncio.Event()

    async def stage_to_host(self, wanted: int | None, *, taken=()) -> int:
        await asyncio.sleep(0)  # the real one reads the DHT: other starts may run meanwhile
        busy = {0, *self.hosted, *taken}
        stage = wanted if wanted is not None else min(s for s in range(12) if s not in busy)
        if stage in busy or stage >= 12:
            raise DelegationRefused(f"stage {stage} is served here already")
        return stage

    async def host_stage(self, stage: int, *, on_behalf_of: str, on_work) -> None:
        self.hosted[stage] = (on_behalf_of, on_work)
        self.loaded.set()

    async def release_stage(self, stage: int) -> None:
        if self.hosted.pop(stage, None) is not None:
            self.released.append(stage)

    def hosted_record(self, stage: int) -> PeerRecord | None:
        if stage not in self.hosted:
            return None
        return PeerRecord(peer_id=DELEGATE, stage=stage, layers=self.stage_layers(stage), state=PeerState.ONLINE,
                          delegate_of=self.hosted[stage][0], step=3)

    def stage_layers(self, stage: int) -> LayerRange:
        return LayerRange(start=stage, end=stage + 1)

    def gpu_count(self) -> int:
        return 2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _delegate(tokens: TokenSet | None = None, **options):
    host, clock = FakeHost(), Clock()
    sessions = DelegateSessions(host, tokens or TokenSet([TOKEN]), clock=clock, **options)
    hub = InMemoryTransport()
    await DelegationService(sessions).register(hub.bind(DELEGATE).serve)
    return host, clock, sessions, DelegationClient(hub, DELEGATE, attempts=1)


def run(coro):
    return asyncio.run(coro)


def test_a_session_serves_a_free_stage_and_hands_back_receipts_until_acknowledged():
    async def scenario():
        host, _, sessions, client = await _delegate()
        started = await client.start(TOKEN, "QmWeak")
        assert (started.stage, started.ttl, started.gpu_count) == (1, 330.0, 2)
        await asyncio.wait_for(host.loaded.wait(), 5)
        await asyncio.sleep(0)
        first = await client.poll(started.session_id, 0)
        assert first.state == SessionState.ACTIVE and first.record.delegate_of == "QmWeak"
        _, on_work = host.hosted[1]
        hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
        layers = LayerRange(start=2, end=4)
        for kind, request in ((FORWARD, ForwardRequest(stage=1, layers=layers, request_id="r1")),
                              (BACKWARD, BackwardRequest(stage=1, layers=layers, request_id="r1", num_samples=2)),
                              (FORWARD, ForwardRequest(stage=1, layers=layers, request_id="r2"))):
            await on_work(kind, request, [hidden], {"ok": {}}, [hidden * 2])
        polled = await client.poll(started.session_id, 0)
        assert [(r.seq, r.kind, r.request_id, r.tokens) for r in polled.receipts] == [
            (0, "forward", "r1", 6), (1, "backward", "r1", 6), (2, "forward", "r2", 6)]
        assert polled.receipts[0].digest == tensor_digest(hidden * 2) != tensor_digest(hidden)
        assert [r.seq for r in (await client.poll(started.session_id, 2)).receipts] == [2]
        status = await client.status()
        assert (status.total_sessions, status.active_sessions, status.max_sessions) == (1, 1, 10)
        info = status.sessions[0]
        assert (info.delegator, info.stage, info.gpu_count, info.microbatches, info.tokens) == ("QmWeak", 1, 2, 2, 18)
        stopped = await client.stop(started.session_id, 3)
        assert stopped.receipts == [] and host.released == [1]
        with pytest.raises(UnknownSession, match="stopped by its delegator"):
            await client.poll(started.session_id, 3)

    run(scenario())


def test_the_eleventh_session_gets_a_capacity_error_and_a_repeated_start_gets_the_same_session():
    async def scenario():
        _, _, sessions, client = await _delegate()
        ids = [(await client.start(TOKEN, f"QmWeak{i}")).session_id for i in range(10)]
        assert len(set(ids)) == 10
        assert (await client.start(TOKEN, "QmWeak3")).session_id == ids[3]  # a retried start: no new session
        with pytest.raises(CapacityExceeded, match="at capacity: 10 of 10 sessions"):
            await client.start(TOKEN, "QmWeak10")
        await sessions.stop()

    run(scenario())


def test_bad_token_and_unsupported_work_are_refused_with_a_reason():
    async def scenario():
        host, _, sessions, client = await _delegate()
        with pytest.raises(AuthRejected, match="does not accept that delegation token"):
            await client.start(TOKEN[:-1], "QmWeak")
        with pytest.raises(DelegationRefused, match="stage 0 is served here"):
            await client.start(TOKEN, "QmWeak", stage=0)
        with pytest.raises(UnknownSession, match="never issued"):
            await client.poll("f" * 32, 0)
        assert host.hosted == {} and sessions.total == 0

    run(scenario())


def test_token_comparison_accepts_only_the_whole_token():
    tokens = TokenSet(["alpha-secret", "beta-secret"])
    assert tokens.accepts("beta-secret")
    assert not any(tokens.accepts(t) for t in ("beta-secre", "beta-secret ", "", "alpha-secret-"))
    assert not TokenSet([])


def test_a_session_not_polled_for_its_ttl_expires_and_frees_its_stage():
    async def scenario():
        host, clock, sessions, client = await _delegate(ttl=30.0)
        started = await client.start(TOKEN, "QmWeak")
        await asyncio.wait_for(host.loaded.wait(), 5)
        clock.now += 29
        await client.poll(started.session_id, 0)  # a poll keeps it alive
        clock.now += 29
        await sessions.sweep()
        assert 1 in host.hosted
        clock.now += 2
        await sessions.sweep()
        assert host.released == [1] and sessions.status().active_sessions == 0
        with pytest.raises(UnknownSession, match="not polled for 30 s"):
            await client.poll(started.session_id, 0)
        assert sessions.status().sessions[0].status == SessionState.EXPIRED

    run(scenario())


def test_a_revoked_token_ends_its_sessions(tmp_path: Path):
    async def scenario():
        path = tmp_path / "tokens"
        path.write_text(f"# accepted delegation tokens\n{TOKEN}\nother-token\n")
        host, _, sessions, client = await _delegate(TokenSet([], path))
        mine = await client.start(TOKEN, "QmWeak")
        other = await client.start("other-token", "QmOther")
        path.write_text("other-token\n")
        await sessions.sweep()
        assert sorted(host.released) == [mine.stage]
        with pytest.raises(UnknownSession, match="token was revoked"):
            await client.poll(mine.session_id, 0)
        with pytest.raises(AuthRejected):
            await client.start(TOKEN, "QmWeak")
        assert (await client.poll(other.session_id, 0)).session_id == other.session_id

    run(scenario())


def _receipts(n: int) -> list[Receipt]:
    return [Receipt(seq=i, request_id=f"r{i // 2}", kind=("forward", "backward")[i % 2], tokens=8,
                    digest=f"{i:064x}", at=100.0 + i) for i in range(n)]


def _delegated_entry(writer: LedgerWriter, receipts: list[Receipt]) -> LedgerEntry:
    work = Work(microbatches=len({r.request_id for r in receipts}), tokens=sum(r.tokens for r in receipts))
    return writer.append(1, work, 0, 100.0, 110.0, delegate=DELEGATE, receipts=receipts_digest(receipts))


def test_the_bootstrap_credits_the_delegator_notes_the_delegate_and_refuses_forged_receipts(tmp_path: Path):
    delegator = LedgerWriter(tmp_path / "weak.jsonl", key=RSAPrivateKey(), run_id="r", peer_id="QmWeak")
    entries = [_delegated_entry(delegator, _receipts(4)), _delegated_entry(delegator, _receipts(2))]
    book = LedgerBook(tmp_path / "book.jsonl")
    assert book.submit(entries, caller="QmWeak").accepted == 2
    assert book.tally() == {"QmWeak": {"entries": 2, "microbatches": 3, "tokens": 48}}
    assert book.delegates() == {"QmWeak": {DELEGATE: 48}}
    # the delegate signs "the delegator's" receipts with its own key and submits them: refused
    forger = LedgerWriter(tmp_path / "forged.jsonl", key=RSAPrivateKey(), run_id="r", peer_id="QmWeak")
    forged = _delegated_entry(forger, _receipts(6))
    with pytest.raises(AuthRejected, match="submits only its own ledger"):
        book.submit([forged], caller=DELEGATE)
    # an entry of the delegator's chain altered after signing (more tokens): refused by the signature
    altered = _delegated_entry(delegator, _receipts(2)).model_copy(update={"tokens": 10_000})
    response = book.submit([altered], caller="QmWeak")
    assert response.accepted == 0 and "signature" in response.reason
    assert book.tally()["QmWeak"]["tokens"] == 48


def test_delegate_of_no_longer_redirects_credit_and_old_entries_keep_their_signature(tmp_path: Path):
    writer = LedgerWriter(tmp_path / "peer.jsonl", key=RSAPrivateKey(), run_id="r", peer_id="QmPeer",
                          delegate_of="QmSomeoneElse")
    plain = writer.append(0, Work(microbatches=1, tokens=5), 0, 0.0, 1.0)
    assert b"delegate\"" not in plain.signed_bytes() and b"receipts" not in plain.signed_bytes()
    assert verify_chain([plain]).ok
    assert tally([plain]) == {"QmPeer": {"entries": 1, "microbatches": 1, "tokens": 5}}
    assert delegated_tally([plain]) == {}


def test_receipts_digest_covers_every_field():
    receipts = _receipts(3)
    assert receipts_digest(receipts) == receipts_digest(list(receipts))
    changed = [*receipts[:2], receipts[2].model_copy(update={"tokens": 9})]
    assert receipts_digest(changed) != receipts_digest(receipts)


def test_delegation_settings_come_from_toml_env_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from core.config import load_settings
    from core.errors import ConfigError

    defaults = load_settings().delegation
    assert (defaults.accept, defaults.max_sessions, defaults.session_ttl, defaults.poll_interval) == (False, 10, 330.0, 5.0)
    config = tmp_path / "swarm.toml"
    config.write_text('[delegation]\naccept = true\ntokens = ["a", "b"]\nmax_sessions = 4\nsession_ttl = 60\n')
    monkeypatch.setenv("SWARM_DELEGATION__MAX_SESSIONS", "7")
    settings = load_settings(config).delegation
    assert (settings.accept, settings.tokens, settings.max_sessions, settings.session_ttl) == (True, ["a", "b"], 7, 60.0)
    monkeypatch.delenv("SWARM_DELEGATION__MAX_SESSIONS")
    config.write_text("[delegation]\nmax_sessions = 0\n")
    with pytest.raises(ConfigError, match="delegation.max_sessions"):
        load_settings(config)
    with pytest.raises(ConfigError, match="delegation.delegate_to.*lacks the peer id"):
        load_settings(delegation={"delegate_to": ["/ip4/127.0.0.1/tcp/31400"]})


def test_starts_at_the_same_time_get_different_stages():
    async def scenario():
        host, _, sessions, client = await _delegate()
        started = await asyncio.gather(*(client.start(TOKEN, f"QmWeak{i}") for i in range(3)))
        assert sorted(s.stage for s in started) == [1, 2, 3]
        await sessions.stop()
        assert sorted(host.released) == [1, 2, 3]

    run(scenario())
