"""API keys and the bootstrap's SQLite state: real SQLite files in tmp_path."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bootstrap.keys import ApiKey, check_key, generate_key, hash_key, key_id_of, parse_duration
from bootstrap.state import SCHEMA_VERSION, StateDB, contribution_delta
from core.errors import AuthRejected, ConfigError, StateError


@pytest.mark.parametrize("text, seconds", [
    ("30d", 30 * 86400), ("12h", 12 * 3600), ("90m", 5400), ("2w", 14 * 86400), ("45s", 45), (" 1.5h ", 5400),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "d", "30 days", "-1d", "0d", "1y"])
def test_parse_duration_refuses_with_a_hint(text: str) -> None:
    with pytest.raises(ConfigError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize("last, reported, delta", [
    (0, 10, 10), (10, 25, 15), (25, 25, 0), (25, 4, 4), (5, -3, 0),
])
def test_contribution_delta(last: int, reported: int, delta: int) -> None:
    assert contribution_delta(last, reported) == delta


def test_generated_keys_are_distinct_and_parse() -> None:
    (id1, k1), (id2, k2) = generate_key(), generate_key()
    assert k1 != k2 and key_id_of(k1) == id1 and key_id_of(k2) == id2
    assert len(hash_key(k1)) == 64 and hash_key(k1) != hash_key(k2)


@pytest.mark.parametrize("stored_state, error", [
    ({}, None),
    ({"revoked": 50.0}, "revoked"),
    ({"expires": 99.0}, "expired"),
    ({"expires": 101.0}, None),
])
def test_check_key_table(stored_state: dict, error: str | None) -> None:
    key_id, full = generate_key()
    stored = ApiKey(key_id, "alice", 0.0, **stored_state)
    if error is None:
        assert check_key(stored, hash_key(full), full, now=100.0) == stored
    else:
        with pytest.raises(AuthRejected, match=error):
            check_key(stored, hash_key(full), full, now=100.0)


@pytest.mark.parametrize("given", ["", "hunter2", "swk_zz_abc", "swk_0123abcd_short"])
def test_malformed_key_is_refused_by_shape(given: str) -> None:
    with pytest.raises(AuthRejected, match="not a swarm API key"):
        key_id_of(given)


def test_wrong_secret_is_unknown(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    made = db.create_key("alice", actor="test")
    forged = made.secret[:-4] + ("AAAA" if not made.secret.endswith("AAAA") else "BBBB")
    with pytest.raises(AuthRejected, match="unknown API key"):
        db.verify_key(forged)
    assert db.verify_key(made.secret).name == "alice"


def test_keys_are_stored_hashed_and_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = StateDB(path)
    made = db.create_key("alice", actor="owner", expires_in=3600)
    db.close()
    raw = path.read_bytes() + (path.with_name("state.db-wal").read_bytes() if path.with_name("state.db-wal").exists() else b"")
    assert made.secret.encode() not in raw and hash_key(made.secret).encode() in raw
    db = StateDB(path)
    [key] = db.list_keys()
    assert (key.id, key.name, key.state(key.created)) == (made.key.id, "alice", "active")
    assert key.expires == pytest.approx(key.created + 3600)
    assert [(e.actor, e.action) for e in db.audit_log()] == [("owner", "key.create")]


def test_revoke_by_prefix_and_errors(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    a = db.create_key("alice", actor="owner")
    db.create_key("bob", actor="owner")
    with pytest.raises(ConfigError, match="no API key"):
        db.revoke_key("nothex", actor="owner")
    with pytest.raises(ConfigError, match="no API key"):
        db.revoke_key("%", actor="owner")  # LIKE wildcards are taken literally
    revoked = db.revoke_key(a.key.id[:5], actor="owner")
    assert revoked.id == a.key.id and revoked.revoked is not None
    with pytest.raises(AuthRejected, match="revoked"):
        db.verify_key(a.secret)
    assert db.revoke_key(a.secret, actor="owner").id == a.key.id  # the full key names it too
    actions = [e.action for e in db.audit_log()]
    assert actions.count("key.revoke") == 1 and actions.count("key.create") == 2
    with pytest.raises(ConfigError, match="by its id"):
        db.revoke_key("  ", actor="owner")


def test_ambiguous_prefix_names_the_matches(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    for name in ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r"):
        db.create_key(name, actor="owner")
    ids = [k.id for k in db.list_keys()]
    shared = next(c for c in "0123456789abcdef" if sum(i.startswith(c) for i in ids) > 1)
    with pytest.raises(ConfigError, match="give more of the id"):
        db.revoke_key(shared, actor="owner")
    assert all(k.revoked is None for k in db.list_keys())


def test_run_state_is_audited_once_per_change(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    assert db.run_state() == "running"
    assert db.set_run_state("paused", actor="owner") is True
    assert db.set_run_state("paused", actor="owner") is False
    with pytest.raises(ConfigError, match="one of running, paused, stopped"):
        db.set_run_state("asleep", actor="owner")
    assert db.run_state() == "paused"
    assert [e.action for e in db.audit_log()] == ["run.paused"]


def test_metrics_step_and_tallies(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = StateDB(path)
    db.record_metrics(step=3, loss=5.0, tokens_per_second=100.0, peers=2, reports={"p1": 8, "p2": 16}, now=1.0)
    db.record_metrics(step=5, loss=4.0, tokens_per_second=120.0, peers=2, reports={"p1": 24, "p2": 4}, now=2.0)
    db.record_metrics(step=4, loss=None, tokens_per_second=None, peers=1, reports={}, now=3.0)  # a stale report
    db.close()
    db = StateDB(path)
    assert db.step() == 5
    assert [(m.step, m.loss) for m in db.metrics_history()] == [(3, 5.0), (5, 4.0), (4, None)]
    assert [m.step for m in db.metrics_history(since_id=db.metrics_history()[0].id)] == [5, 4]
    assert {c.peer_id: c.samples for c in db.contributions()} == {"p1": 24, "p2": 20}


def test_newer_schema_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    StateDB(path).create_key("alice", actor="owner")
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    before = path.read_bytes()
    with pytest.raises(StateError, match="newer"):
        StateDB(path)
    assert path.read_bytes() == before


def test_corrupt_file_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    before = path.read_bytes()
    with pytest.raises(StateError, match="not a usable swarm state database"):
        StateDB(path)
    assert path.read_bytes() == before


def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER)")
    with pytest.raises(StateError, match="something else"):
        StateDB(path)


def test_a_failed_write_leaves_no_half(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    with pytest.raises(TypeError):
        db.record_metrics(step=1, loss=1.0, tokens_per_second=1.0, peers=1,
                          reports={"p1": 5, "p2": object()})  # type: ignore[dict-item]
    assert db.metrics_history() == [] and db.contributions() == [] and db.step() == 0


def _report(peer: str, role: str, step: int, loss=None, tps: float = 0.0, samples: int = 0):
    from dht.schemas import MetricsReport

    return MetricsReport(peer_id=peer, role=role, step=step, loss=loss, tokens_per_second=tps, samples=samples)


@pytest.mark.parametrize("reports, expected", [
    ([], None),
    ([_report("p1", "peer", 3, samples=24)], (3, None, None, 1, {"p1": 24})),
    ([_report("t1", "trainer", 5, loss=2.0, tps=100.0, samples=40), _report("t2", "trainer", 4, loss=4.0, tps=50.0),
      _report("p1", "peer", 4, samples=32), _report("p2", "peer", 5, samples=40)],
     (5, 3.0, 150.0, 2, {"t1": 40, "t2": 0, "p1": 32, "p2": 40})),
])
def test_summarize_table(reports, expected) -> None:
    from bootstrap.metrics import summarize

    summary = summarize(reports)
    if expected is None:
        assert summary is None
    else:
        assert (summary.step, summary.loss, summary.tokens_per_second, summary.peers, summary.samples) == expected
