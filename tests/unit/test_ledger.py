"""The signed contribution ledger: chains verify, every kind of tampering is caught and named, the
bootstrap's book accepts only chain continuations, and a recorder's entries reach it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hivemind.utils.crypto import RSAPrivateKey

from bootstrap.ledger import LedgerBook, LedgerService
from peers.telemetry.activity import RequestDone
from peers.accounting.contribution import ContributionRecorder, bootstrap_peer_ids
from peers.accounting.ledger import (
    GENESIS,
    LedgerEntry,
    LedgerWriter,
    SubmitRequest,
    Work,
    read_entries,
    sign_entry,
    verify_chain,
    verify_entries,
)
from net.transport import InMemoryTransport
from core.errors import BadRequest, ConfigError
from net.rpc import Raw

KEY = RSAPrivateKey()
OTHER_KEY = RSAPrivateKey()
PEER = "12D3KooWPeerA"


def _chain(tmp_path: Path, n: int = 5, key: RSAPrivateKey = KEY, peer: str = PEER) -> list[LedgerEntry]:
    writer = LedgerWriter(tmp_path / f"{peer}.jsonl", key=key, run_id="r", peer_id=peer)
    for i in range(n):
        writer.append(stage=i % 2, work=Work(microbatches=2 + i, tokens=100 * (i + 1), step_from=i), step_to=i + 1,
                      started=10.0 * i, ended=10.0 * i + 10)
    return writer.entries


def test_a_written_chain_verifies_and_survives_a_reload(tmp_path):
    entries = _chain(tmp_path)
    assert [e.seq for e in entries] == [0, 1, 2, 3, 4] and entries[0].prev == GENESIS
    assert verify_chain(entries).ok
    again = read_entries(tmp_path / f"{PEER}.jsonl")
    assert again == entries
    # a restarted writer with the same key continues the chain
    writer = LedgerWriter(tmp_path / f"{PEER}.jsonl", key=KEY, run_id="r", peer_id=PEER)
    writer.append(0, Work(1, 10, 5), 6, 50.0, 60.0)
    assert writer.entries[-1].seq == 5 and verify_chain(writer.entries).ok


def _altered(entries, index, **change):
    return entries[:index] + [entries[index].model_copy(update=change)] + entries[index + 1:]


def _resigned(entries, index, key=OTHER_KEY, **change):
    return entries[:index] + [sign_entry(entries[index].model_copy(update=change), key)] + entries[index + 1:]


TAMPERING = [
    ("more tokens claimed", lambda e: _altered(e, 2, tokens=10**9), 2, "signature does not match"),
    ("credit moved to another stage", lambda e: _altered(e, 0, stage=7), 0, "signature does not match"),
    ("signature of another entry", lambda e: _altered(e, 3, signature=e[1].signature), 3, "signature"),
    ("re-signed by another key", lambda e: _resigned(e, 1, tokens=1), 1, "signature does not match"),
    ("re-signed with the right key but not re-chained", lambda e: _resigned(e, 1, key=KEY, tokens=1), 2,
     "prev is not the digest"),
    ("an entry dropped", lambda e: e[:2] + e[3:], 2, "seq should be 2"),
    ("two entries swapped", lambda e: [e[0], e[2], e[1], e[3], e[4]], 1, "seq should be 1"),
    ("an entry repeated", lambda e: e[:3] + [e[2]] + e[3:], 3, "seq should be 3"),
    ("the first entries cut off", lambda e: e[2:], 0, "must start at seq 0"),
    ("the key swapped in", lambda e: _resigned(e, 4, public_key=OTHER_KEY.get_public_key().to_bytes().decode()),
     4, "changes peer id or key"),
]


@pytest.mark.parametrize("name, tamper, bad_index, words", TAMPERING, ids=[t[0] for t in TAMPERING])
def test_tampering_is_detected_at_the_first_bad_entry(tmp_path, name, tamper, bad_index, words):
    check = verify_chain(tamper(_chain(tmp_path)))
    assert not check.ok
    assert check.bad_index == bad_index, check.reason
    assert words in check.reason


def test_a_mix_of_chains_is_checked_chain_by_chain(tmp_path):
    a, b = _chain(tmp_path, 3), _chain(tmp_path, 3, key=OTHER_KEY, peer="12D3KooWPeerB")
    mixed = [a[0], b[0], a[1], b[1], b[2], a[2]]
    check = verify_entries(mixed)
    assert check.ok and check.chains == 2
    tampered = list(mixed)
    tampered[4] = tampered[4].model_copy(update={"tokens": 5})
    assert verify_entries(tampered).bad_index == 4


def test_the_book_accepts_continuations_only_and_reloads(tmp_path):
    entries = _chain(tmp_path, 4)
    book = LedgerBook(tmp_path / "book.jsonl")
    first = book.submit(entries[:2])
    assert (first.accepted, first.next_seq, first.reason) == (2, 2, "")
    again = book.submit(entries[:3])  # a resubmission overlapping what is held: only the new one counts
    assert (again.accepted, again.next_seq) == (1, 3)
    forged = book.submit([entries[3].model_copy(update={"tokens": 10**6})])
    assert forged.accepted == 0 and forged.next_seq == 3 and "signature" in forged.reason
    assert book.tally() == {PEER: {"entries": 3, "microbatches": 2 + 3 + 4, "tokens": 100 + 200 + 300}}
    reloaded = LedgerBook(tmp_path / "book.jsonl")
    assert reloaded.entries == entries[:3]
    with pytest.raises(BadRequest, match="one chain"):
        book.submit([entries[3], _chain(tmp_path, 1, key=OTHER_KEY, peer="12D3KooWPeerB")[0]])


def test_a_tampered_book_file_refuses_to_load(tmp_path):
    path = tmp_path / "book.jsonl"
    book = LedgerBook(path)
    book.submit(_chain(tmp_path, 3))
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["tokens"] += 1
    lines[1] = json.dumps(entry)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="line 2"):
        LedgerBook(path)


def test_recorder_windows_reach_the_bootstrap_through_the_ledger_rpc(tmp_path):
    async def scenario():
        hub = InMemoryTransport()
        book = LedgerBook(tmp_path / "book.jsonl")
        await LedgerService(book).register(hub.bind("boot"))
        steps = {0: 3}
        writer = LedgerWriter(tmp_path / "peer.jsonl", key=KEY, run_id="r", peer_id=PEER)
        clock = iter(range(100, 200))
        recorder = ContributionRecorder(writer, window=30, step_of=steps.get, transport=hub.bind(PEER),
                                        bootstrap_ids=["gone", "boot"], clock=lambda: float(next(clock)))
        for tokens in (64, 64, 32):
            recorder.observe(RequestDone("forward", 0.1, True, 0, 2, tokens))
        recorder.observe(RequestDone("forward", 0.1, False, 0, 2, 64))  # failed: not credited
        recorder.observe(RequestDone("info", 0.1, True, None, 0, 0))  # control call: not work
        steps[0] = 5
        [entry] = recorder.cut()
        assert (entry.stage, entry.microbatches, entry.tokens, entry.step_from, entry.step_to) == (0, 3, 160, 3, 5)
        assert await recorder.submit() == 1 and recorder.acked_next == 1
        assert recorder.cut() == []  # an idle window writes nothing
        assert await recorder.submit() == 0
        return book

    book = asyncio.run(scenario())
    assert book.tally() == {PEER: {"entries": 1, "microbatches": 3, "tokens": 160}}


def test_bootstrap_peer_ids():
    assert bootstrap_peer_ids(["/ip4/1.2.3.4/tcp/1/p2p/QmA", "/ip4/5.6.7.8/tcp/2/p2p/QmA", "/ip4/1.1.1.1/tcp/3"]) == ["QmA"]


def test_report_check_prints_the_verdict_and_verified_totals(tmp_path):
    from rich.console import Console

    from swarm.ledger_cli import report_check

    entries = _chain(tmp_path, 4)
    console = Console(width=120, record=True, color_system=None)
    assert report_check(entries, "good.jsonl", console) == 0
    text = console.export_text()
    assert "OK: 4 entries in 1 chain(s)" in text and "1,000" in text  # 100+200+300+400 tokens
    assert report_check(_altered(entries, 2, microbatches=999), "bad.jsonl", console) == 1
    text = console.export_text()
    assert "BAD: entry #3 (line 3)" in text and "signature does not match" in text and "300" in text


@pytest.mark.parametrize("message, code, words", [
    ({"version": 99, "entries": []}, "ProtocolMismatch", "ledger protocol version 99"),
    ({"entries": []}, "BadRequest", "entries"),
    ("junk", "BadRequest", "expected a map"),
])
def test_bad_submits_get_a_named_error_and_the_book_keeps_serving(tmp_path, message, code, words):
    async def scenario():
        hub = InMemoryTransport()
        book = LedgerBook(tmp_path / "book.jsonl")
        await LedgerService(book).register(hub.bind("boot"))
        reply, _ = await hub.call("boot", "swarm.ledger.submit", Raw(message), [], timeout=5)
        good, _ = await hub.call("boot", "swarm.ledger.submit",
                                 SubmitRequest(entries=_chain(tmp_path, 1)), [], timeout=5)
        return reply, good

    reply, good = asyncio.run(scenario())
    assert reply["error"]["code"] == code and words in reply["error"]["message"]
    assert good["ok"]["accepted"] == 1
