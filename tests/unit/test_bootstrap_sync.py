"""The sync between a run's bootstraps: the merge rule (tables), the authority signature (forgery,
replay, wrong target), and the state.db schema migration from version 1 that the merge needs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hivemind.utils.crypto import RSAPrivateKey

from bootstrap.state import SCHEMA_VERSION, StateDB
from bootstrap.sync import (
    MAX_SKEW,
    KeyRow,
    NonceWindow,
    RunStateRow,
    merge_banned,
    merge_key,
    merge_run_state,
    sign_sync,
    verify_sync,
)
from core.errors import AuthRejected, StateError

H = "a" * 64


def key(**fields) -> KeyRow:
    return KeyRow(**{"id": "0000beef", "name": "alice", "hash": H, "created": 100.0, "updated_at": 100.0, **fields})


@pytest.mark.parametrize(
    ("local", "remote", "expected"),
    [
        pytest.param(None, key(), key(), id="unknown here: copied"),
        pytest.param(key(), key(), None, id="same row: nothing to do"),
        pytest.param(key(), key(revoked=150.0, updated_at=150.0), key(revoked=150.0, updated_at=150.0),
                     id="revoked there: revoked here"),
        pytest.param(key(revoked=150.0, updated_at=150.0), key(), None,
                     id="revoked here, older row there: stays revoked"),
        pytest.param(key(revoked=150.0, updated_at=150.0), key(name="bob", updated_at=200.0),
                     key(name="bob", revoked=150.0, updated_at=200.0),
                     id="newer rename without revocation: revocation is monotonic"),
        pytest.param(key(revoked=150.0, updated_at=150.0), key(revoked=120.0, updated_at=120.0),
                     key(revoked=120.0, updated_at=150.0), id="revoked on both: the earliest revocation"),
        pytest.param(key(expires=500.0), key(expires=900.0, updated_at=300.0),
                     key(expires=900.0, updated_at=300.0), id="newer expiry wins (last writer)"),
        pytest.param(key(expires=900.0, updated_at=300.0), key(expires=500.0), None,
                     id="older expiry loses"),
        pytest.param(key(name="a"), key(name="b"), key(name="b"), id="tie: the same row on both sides"),
        pytest.param(key(name="b"), key(name="a"), None, id="tie, the other way round: same winner"),
    ],
)
def test_merge_key(local: KeyRow | None, remote: KeyRow, expected: KeyRow | None) -> None:
    assert merge_key(local, remote) == expected


def test_merge_key_is_commutative_and_idempotent() -> None:
    rows = [key(), key(revoked=150.0, updated_at=150.0), key(name="b", expires=900.0, updated_at=300.0),
            key(revoked=120.0, updated_at=120.0)]
    for a in rows:
        for b in rows:
            ab = merge_key(a, b) or a
            ba = merge_key(b, a) or b
            assert ab == ba, (a, b)
            assert merge_key(ab, b) is None and merge_key(ab, a) is None


def test_merge_key_refuses_two_secrets_under_one_id() -> None:
    with pytest.raises(StateError, match="key 0000beef has a different secret"):
        merge_key(key(), key(hash="b" * 64))


@pytest.mark.parametrize(
    ("local", "remote", "expected"),
    [
        (("running", 0.0), ("paused", 10.0), ("paused", 10.0)),
        (("paused", 10.0), ("running", 5.0), None),
        (("paused", 10.0), ("running", 20.0), ("running", 20.0)),
        (("running", 10.0), ("stopped", 10.0), ("stopped", 10.0)),
        (("stopped", 10.0), ("paused", 10.0), None),
        (("paused", 10.0), ("paused", 10.0), None),
    ],
)
def test_merge_run_state(local, remote, expected) -> None:
    result = merge_run_state(RunStateRow(state=local[0], at=local[1]), RunStateRow(state=remote[0], at=remote[1]))
    assert (None if result is None else (result.state, result.at)) == expected


AUTHORITY = RSAPrivateKey()


def message(authority=AUTHORITY, **fields):
    args = {"run_id": "run", "sender": "QmA", "target": "QmB", "at": 1000.0, "keys": [key()],
            "run_state": RunStateRow(state="paused", at=5.0), **fields}
    return sign_sync(authority, **args)


@pytest.mark.parametrize(
    ("msg", "checks", "error"),
    [
        (message(), {}, None),
        (message(authority=RSAPrivateKey()), {}, "not signed by this run's authority key"),
        (message().model_copy(update={"keys": [key(revoked=1.0)]}), {}, "not signed"),  # tampered
        (message(), {"sender": "QmEve"}, "sent by"),
        (message(target="QmC"), {}, "addressed to"),
        (message(run_id="other"), {}, "for run 'other'"),
        (message(at=1000.0 - MAX_SKEW - 1), {}, "s old"),
        (message(), {"in_reply_to": "ff" * 16}, "does not answer"),
    ],
)
def test_verify_sync(msg, checks, error) -> None:
    kwargs = {"run_id": "run", "sender": "QmA", "target": "QmB", "now": 1000.0, **checks}
    if error is None:
        verify_sync(msg, AUTHORITY.get_public_key(), **kwargs)
    else:
        with pytest.raises(AuthRejected, match=error):
            verify_sync(msg, AUTHORITY.get_public_key(), **kwargs)


def test_a_replayed_sync_is_refused() -> None:
    nonces, msg = NonceWindow(), message()
    verify_sync(msg, AUTHORITY.get_public_key(), run_id="run", sender="QmA", target="QmB", now=1000.0, nonces=nonces)
    with pytest.raises(AuthRejected, match="replay"):
        verify_sync(msg, AUTHORITY.get_public_key(), run_id="run", sender="QmA", target="QmB", now=1001.0,
                    nonces=nonces)


_V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL, expires REAL, revoked REAL);
CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');
CREATE TABLE metrics (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, step INTEGER NOT NULL,
    loss REAL, tokens_per_second REAL, peers INTEGER NOT NULL);
CREATE TABLE contributions (peer_id TEXT PRIMARY KEY, samples INTEGER NOT NULL, last_reported INTEGER NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL);
"""


def test_a_version_1_database_is_migrated_keeping_everything(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    secret = "swk_0000beef_" + "x" * 43
    from bootstrap.keys import hash_key

    with sqlite3.connect(path) as conn:
        conn.executescript(_V1_SCHEMA)
        conn.execute("INSERT INTO api_keys VALUES('0000beef', 'alice', ?, 100.0, NULL, NULL)", (hash_key(secret),))
        conn.execute("INSERT INTO api_keys VALUES('0000cafe', 'bob', ?, 110.0, NULL, 130.0)", (H,))
        conn.execute("INSERT INTO meta VALUES('run_state', 'paused')")
        conn.execute("INSERT INTO audit(at, actor, action) VALUES(1.0, 'cli', 'key.create')")
        conn.execute("PRAGMA user_version=1")

    db = StateDB(path)
    try:
        assert db._read("PRAGMA user_version")[0][0] == SCHEMA_VERSION == 4
        assert db.query("SELECT count(*) FROM data_shards") == [(0,)]  # 2 -> 3 made the data tables
        rows = {r.id: r for r in db.key_rows()}
        assert (rows["0000beef"].updated_at, rows["0000cafe"].updated_at, rows["0000cafe"].revoked) == (100.0, 130.0, 130.0)
        assert db.verify_key(secret).name == "alice"  # the old key still works
        assert db.verify_key(secret, scope="api").scopes == ("join", "api")  # for what it did before scopes
        assert db.peer_history("anyone") == []  # the fleet view's table exists
        assert db.run_state_row() == ("paused", 0.0)
        assert [(e.actor, e.action) for e in db.audit_log()][:2] == [("state", "state.migrate"), ("cli", "key.create")]
    finally:
        db.close()
    StateDB(path).close()  # opening again is a no-op


def test_merge_sync_writes_and_audits(tmp_path: Path) -> None:
    here, there = StateDB(tmp_path / "a.db"), StateDB(tmp_path / "b.db")
    try:
        new = there.create_key("carol", actor="cli", now=200.0)
        gone = here.create_key("dave", actor="cli", now=210.0)
        there.merge_sync(here.key_rows(), RunStateRow(state="running", at=0.0), source="sync:A")
        there.revoke_key(gone.key.id, actor="cli", now=300.0)
        there.set_run_state("paused", actor="cli")
        state, at = there.run_state_row()
        changes = here.merge_sync(there.key_rows(), RunStateRow(state=state, at=at), source="sync:B")
        assert sorted(changes) == sorted([f"key.create {new.key.id}", f"key.revoke {gone.key.id}", "run paused"])
        assert here.verify_key(new.secret).name == "carol"
        assert here.key_rows() == there.key_rows()
        assert here.run_state_row() == there.run_state_row()
        assert here.merge_sync(there.key_rows(), RunStateRow(state=state, at=at), source="sync:B") == []
        audit = [(e.actor, e.action) for e in here.audit_log()]
        assert ("sync:B", "sync.key.create") in audit and ("sync:B", "sync.key.revoke") in audit
        assert ("sync:B", "sync.run.paused") in audit
    finally:
        here.close()
        there.close()


def test_bans_are_merged_as_a_union_with_the_later_time(tmp_path: Path) -> None:
    """A peer the owner banned on either bootstrap is banned on both, and both end with the same
    ``banned_at``: their run-control records are equal, so a mirror's cannot undo the primary's ban."""
    here, there = StateDB(tmp_path / "a.db"), StateDB(tmp_path / "b.db")
    try:
        assert here.ban_peer("peer-one", actor="cli", action="peer.ban", now=100.0)
        assert there.ban_peer("peer-two", actor="cli", action="peer.ban", now=200.0)
        assert there.ban_peer("peer-one", actor="cli", action="peer.ban", now=150.0)
        state = RunStateRow(state="running", at=0.0)
        assert here.merge_sync([], state, source="sync:B", banned=there.banned_row()[0],
                               banned_at=there.banned_row()[1]) == ["ban peer-two"]
        assert there.merge_sync([], state, source="sync:A", banned=here.banned_row()[0],
                                banned_at=here.banned_row()[1]) == []
        assert here.banned_row() == (["peer-one", "peer-two"], 200.0)
        assert there.banned_row() == (["peer-two", "peer-one"], 200.0)  # same set, this side's order kept
        assert ("sync:B", "sync.peer.ban") in [(e.actor, e.action) for e in here.audit_log()]
        assert here.merge_sync([], state, source="sync:B", banned=["peer-two"], banned_at=200.0) == []
    finally:
        here.close()
        there.close()


@pytest.mark.parametrize("local, remote, expected", [
    ([], [], []),
    (["a"], ["b", "a"], ["a", "b"]),
    (["a", "b"], ["b", "c", "c"], ["a", "b", "c"]),
    ([f"p{i}" for i in range(512)], ["new"], [f"p{i}" for i in range(1, 512)] + ["new"]),  # the newest kept
])
def test_merge_banned(local, remote, expected) -> None:
    assert merge_banned(local, remote) == expected
