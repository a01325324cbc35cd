"""The ledger's credit cap (``bootstrap.credit``) as tables, and the book refusing and auditing what
exceeds it: the issue's probe (a fresh chain of a key holder claiming 10^12 tokens) is refused and
audited under the submitter, honest entries still count, and an early honest entry is taken later."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hivemind.utils.crypto import RSAPrivateKey

from bootstrap.credit import (DEFAULT_MAX_POSITIONS, GRACE_STEPS, PASSES, admit, credit_cap, max_positions,
                              round_step, step_advance, tokens_per_step)
from bootstrap.ledger import LedgerBook
from bootstrap.state import StateDB
from peers.accounting.ledger import LedgerWriter, Work

KEY = RSAPrivateKey()
PEER = "12D3KooWHonest"
LIAR = "12D3KooWLiar"


@pytest.mark.parametrize("steps, expected", [
    ([], None), ([7], 7), ([3, 5], 3), ([5, 5, 10**9], 5),  # one huge report does not move the median
    ([1, 2, 3, 4], 2), ([9, 0, 9], 9),
])
def test_round_step_is_the_lower_median(steps, expected):
    assert round_step(steps) == expected


@pytest.mark.parametrize("previous, step, expected", [
    (None, 5, 0), (5, None, 0), (5, 5, 0), (5, 8, 3), (8, 5, 0),
])
def test_step_advance(previous, step, expected):
    assert step_advance(previous, step) == expected


@pytest.mark.parametrize("config, expected", [
    (SimpleNamespace(n_positions=1024), 1024), (SimpleNamespace(max_position_embeddings=4096), 4096),
    (SimpleNamespace(), DEFAULT_MAX_POSITIONS), (SimpleNamespace(n_positions=None), DEFAULT_MAX_POSITIONS),
])
def test_max_positions(config, expected):
    assert max_positions(config) == expected


@pytest.mark.parametrize("per_step, online, expected", [
    (100, 0, 100 * GRACE_STEPS), (100, 10, 100 * (10 + GRACE_STEPS)), (100, -3, 100 * GRACE_STEPS),
])
def test_credit_cap(per_step, online, expected):
    assert credit_cap(per_step, online) == expected


@pytest.mark.parametrize("tokens, credited, cap, fits, why", [
    ([], 0, 10, 0, ""),
    ([3, 3, 3], 0, 10, 3, ""),
    ([3, 3, 5], 0, 10, 2, "entry 3 would bring this peer's credit to 11 tokens"),
    ([1], 10, 10, 0, "entry 1 would bring this peer's credit to 11 tokens"),
    ([10**12], 0, 32_768, 0, "more than the run could have done"),
    ([0, 0], 10, 10, 2, ""),
])
def test_admit(tokens, credited, cap, fits, why):
    got, reason = admit(tokens, credited, cap)
    assert got == fits and why in reason and (reason == "") == (fits == len(tokens))


def test_tokens_per_step():
    assert tokens_per_step(8, 1024) == PASSES * 8 * 1024


def _entries(tmp_path, peer: str, tokens: list[int]):
    writer = LedgerWriter(tmp_path / f"{peer}.jsonl", key=KEY, run_id="r", peer_id=peer)
    for i, t in enumerate(tokens):
        writer.append(stage=0, work=Work(microbatches=1, tokens=t, step_from=i), step_to=i + 1, started=i, ended=i + 1)
    return writer.entries


def test_the_book_refuses_and_audits_credit_beyond_the_cap(tmp_path):
    db = StateDB(tmp_path / "state.db")
    per_step = tokens_per_step(8, 256)
    book = LedgerBook(tmp_path / "book.jsonl", cap=lambda peer: credit_cap(per_step, db.online_steps().get(peer, 0)),
                      audit=db.audit)
    db.add_online_steps([PEER, LIAR], 3)

    probe = _entries(tmp_path, LIAR, [10**12])
    refused = book.submit(probe, caller=LIAR)
    assert refused.accepted == 0 and refused.next_seq == 0 and "more than the run could have done" in refused.reason
    assert book.submit(probe, caller=LIAR).accepted == 0  # resubmitted every window: audited once
    audits = [(e.actor, e.action) for e in db.audit_log()]
    assert audits.count((LIAR, "ledger.refused")) == 1
    assert "1,000,000,000,000 tokens" in db.audit_log()[0].detail and LIAR not in book.tally()

    honest = _entries(tmp_path, PEER, [2 * 8 * 128] * 6)  # 2 passes x batch 8 x 128 tokens, a step each
    first = book.submit(honest, caller=PEER)
    assert (first.accepted, first.reason) == (6, "") and book.tally()[PEER]["tokens"] == 6 * 2048

    # an honest entry that arrives before a round saw its steps is refused now and accepted later
    cap = credit_cap(per_step, 3)
    writer = LedgerWriter(tmp_path / f"{PEER}.jsonl", key=KEY, run_id="r", peer_id=PEER)
    early = writer.append(stage=0, work=Work(microbatches=4, tokens=cap - 6 * 2048 + 1, step_from=6), step_to=7,
                          started=6, ended=7)
    refused = book.submit([early], caller=PEER)
    assert (refused.accepted, refused.next_seq) == (0, 6) and f"({cap:,})" in refused.reason
    db.add_online_steps([PEER], 1)
    later = book.submit([early], caller=PEER)
    assert (later.accepted, later.next_seq) == (1, 7) and book.tally()[PEER]["tokens"] == cap + 1
    assert [e.action for e in db.audit_log() if e.actor == PEER] == ["ledger.refused"]
    db.close()


def test_the_bootstrap_counts_the_steps_each_peer_was_online(tmp_path):
    """Each metrics round credits the peers online in it with the run's (median) step advance; a
    report of a huge step by one reporter does not count, and a stage record's delegator counts."""
    import asyncio

    from bootstrap.node import BootstrapNode, _online_in
    from dht.schemas import MetricsReport
    from dht.schemas import PeerRecord, PeerState
    from core.types import LayerRange
    from core.config import load_settings

    node = BootstrapNode(load_settings(state_dir=tmp_path))
    node.db = StateDB(tmp_path / "state.db")

    def report(peer: str, step: int, role: str = "peer") -> MetricsReport:
        return MetricsReport(peer_id=peer, role=role, step=step)

    rounds = [  # (reports, online): steps 4 -> 6 -> 6 -> 9 (a liar's 10^9 is outvoted)
        ([report("a", 4), report("t", 4, "trainer")], {"a"}),
        ([report("a", 6), report("b", 6), report("t", 6, "trainer")], {"a", "b"}),
        ([report("a", 6), report("t", 6, "trainer")], {"a"}),
        ([report("a", 9), report("b", 9), report(LIAR, 10**9)], {"a", "b", LIAR}),
    ]
    for reports, online in rounds:
        asyncio.run(node._count_online_steps(reports, online))
    assert node.db.online_steps() == {"a": 2 + 3, "b": 2 + 3, LIAR: 3}

    records = {0: [PeerRecord(peer_id="d", stage=0, layers=LayerRange(start=0, end=1), state=PeerState.ONLINE, delegate_of="w"),
                   PeerRecord(peer_id="off", stage=0, layers=LayerRange(start=0, end=1), state=PeerState.OFFLINE)]}
    assert _online_in(records) == {"d", "w"}
    node.db.close()
