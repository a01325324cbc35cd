"""``StateDB``: the bootstrap's durable state in one SQLite file (``<state_dir>/<run>/state.db``).

Keys (hashed), the audit log, the metrics history, the run state, the collaborative step and the
per-peer contribution tallies. Every write is one transaction (``with self._conn``), so a kill -9 in
the middle of one leaves the previous state, never half of a change. The schema version is SQLite's
``user_version``: a database from a newer swarm, or a file that is not a sound SQLite database, is
refused with ``StateError`` naming the file; it is never reset silently, since it holds the run's keys.

The bootstrap and ``swarm keys`` / ``swarm run`` on the same machine open the same file (WAL mode,
a busy timeout): the CLI writes, the bootstrap notices within a second and acts (see ``BootstrapNode``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bootstrap.keys import ApiKey, NewKey, check_key, generate_key, hash_key, key_id_of, parse_scopes
from core.errors import ConfigError, StateError
from core.types import PeerId

if TYPE_CHECKING:  # bootstrap.sync imports pydantic and hivemind; `swarm keys` opens the DB without them
    from bootstrap.sync import KeyRow, RunStateRow

__all__ = [
    "SCHEMA_VERSION",
    "RUN_STATES",
    "AuditEntry",
    "MetricPoint",
    "Contribution",
    "PeerSample",
    "StateDB",
    "contribution_delta",
]

SCHEMA_VERSION = 4
RUN_STATES = ("running", "paused", "stopped")
_MAX_TEXT = 500

_PEER_SAMPLES = """
CREATE TABLE peer_samples (
    at REAL NOT NULL, peer_id TEXT NOT NULL, throughput REAL, latency_ms REAL, cpu_percent REAL,
    gpu_util_percent REAL, gpu_memory_used_gib REAL, gpu_memory_gib REAL, gpu_temperature_c REAL, gpu_power_w REAL
);
CREATE INDEX peer_samples_peer_at ON peer_samples(peer_id, at);
CREATE INDEX peer_samples_at ON peer_samples(at)
"""
_DATA_SCHEMA = """
CREATE TABLE data_sets (dataset_id TEXT PRIMARY KEY, spec TEXT NOT NULL, last_used REAL NOT NULL);
CREATE TABLE data_shards (
    dataset_id TEXT NOT NULL, epoch INTEGER NOT NULL, shard INTEGER NOT NULL, holder TEXT,
    expires REAL NOT NULL DEFAULT 0, doc INTEGER NOT NULL DEFAULT 0, doc_offset INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0, step INTEGER NOT NULL DEFAULT 0, done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (dataset_id, epoch, shard)
);
CREATE TABLE evals (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, dataset_id TEXT NOT NULL, step INTEGER NOT NULL,
    loss REAL NOT NULL, tokens INTEGER NOT NULL, peer_id TEXT NOT NULL
);
"""
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL, expires REAL, revoked REAL, updated_at REAL NOT NULL DEFAULT 0,
    scopes TEXT NOT NULL DEFAULT 'join'
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE metrics (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, step INTEGER NOT NULL,
    loss REAL, tokens_per_second REAL, peers INTEGER NOT NULL
);
CREATE TABLE contributions (
    peer_id TEXT PRIMARY KEY, samples INTEGER NOT NULL, last_reported INTEGER NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL
);
""" + _DATA_SCHEMA


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    action: str
    detail: str


@dataclass(frozen=True)
class MetricPoint:
    id: int
    at: float
    step: int
    loss: float | None
    tokens_per_second: float | None
    peers: int


@dataclass(frozen=True)
class Contribution:
    peer_id: PeerId
    samples: int
    first_seen: float
    last_seen: float


@dataclass(frozen=True)
class PeerSample:
    """One peer's live figures at one collection round (``peer_samples``): what the dashboard's
    per-peer history charts draw. GPU fields are None on a CPU peer (and for a peer whose record
    does not carry them); memory is GiB, temperature Celsius, power watts, means over its GPUs."""

    at: float
    peer_id: PeerId
    throughput: float | None = None
    latency_ms: float | None = None
    cpu_percent: float | None = None
    gpu_util_percent: float | None = None
    gpu_memory_used_gib: float | None = None
    gpu_memory_gib: float | None = None
    gpu_temperature_c: float | None = None
    gpu_power_w: float | None = None


_SAMPLE_FIELDS = tuple(PeerSample.__dataclass_fields__)


def contribution_delta(last_reported: int, reported: int) -> int:
    """Samples to add to a tally: peers report a running total, which starts again at 0 when the
    peer restarts, so a smaller total than last time is all new work."""
    if reported < 0:
        return 0
    return reported - last_reported if reported >= last_reported else reported


class StateDB:
    """One SQLite connection, used from any thread (serialised by a lock)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise StateError(f"cannot open the state database {self.path}: {e}") from None
        try:
            self._prepare()
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise StateError(
                f"{self.path} is not a usable swarm state database ({e}); it was left untouched: "
                "restore it from a backup, or move it away to start with no keys and no history"
            ) from None
        except StateError:
            self._conn.close()
            raise

    def _prepare(self) -> None:
        conn = self._conn
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(
                f"{self.path} has schema version {version}, newer than this swarm's {SCHEMA_VERSION}: "
                "it was written by a newer swarm; upgrade swarm rather than lose its keys and history"
            )
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise StateError(f"{self.path} is damaged (SQLite quick_check: {check}); it was left untouched")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        if version == 0:
            self._create_schema()
        elif version < SCHEMA_VERSION:
            self._migrate()

    def _create_schema(self) -> None:
        """Create the tables in one transaction; another process doing the same at once waits and
        then finds them made."""
        with self._tx() as c:
            if c.execute("PRAGMA user_version").fetchone()[0] != 0:
                return
            if c.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]:
                raise StateError(f"{self.path} is an SQLite database of something else (no swarm schema version)")
            for statement in filter(str.strip, (_SCHEMA + ";" + _PEER_SAMPLES).split(";")):
                c.execute(statement)
            c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _migrate(self) -> None:
        """Bring an older database up to ``SCHEMA_VERSION`` in one transaction (all or nothing), keeping
        every row. 1 -> 2: ``api_keys.updated_at`` (the merge rule of ``bootstrap.sync`` needs it),
        set to the key's last change (its revocation, else its creation). 2 -> 3: the data leases'
        and evaluations' tables (``bootstrap.leases``), empty. 3 -> 4: ``api_keys.scopes`` (keys made
        before scopes keep what they could do: join and the API) and ``peer_samples``."""
        with self._tx() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version >= SCHEMA_VERSION:
                return  # another process migrated it while we waited for the lock
            if version < 2:
                c.execute("ALTER TABLE api_keys ADD COLUMN updated_at REAL NOT NULL DEFAULT 0")
                c.execute("UPDATE api_keys SET updated_at = max(created, coalesce(revoked, 0))")
            if version < 3:
                for statement in filter(str.strip, _DATA_SCHEMA.split(";")):
                    c.execute(statement)
            if version < 4:
                c.execute("ALTER TABLE api_keys ADD COLUMN scopes TEXT NOT NULL DEFAULT 'join'")
                c.execute("UPDATE api_keys SET scopes = 'join,api'")
                for statement in filter(str.strip, _PEER_SAMPLES.split(";")):
                    c.execute(statement)
            c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            _audit(c, "state", "state.migrate", f"schema {version} -> {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _tx(self):
        """A write transaction, begun IMMEDIATE so two writers queue instead of failing later."""
        return _Transaction(self._conn, self._lock)

    def transaction(self):
        """A write transaction (``with db.transaction() as c:``) for the tables other modules keep
        here (``bootstrap.leases``): one lock and one file for all of the run's state."""
        return self._tx()

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Rows of a read-only ``sql``; ``StateError`` if the file cannot be read."""
        return self._read(sql, args)

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._conn.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as e:
                raise StateError(f"reading {self.path} failed: {e}") from None

    # -- meta: run state, step, anything small --------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else default

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                      (key, value))

    def run_state(self) -> str:
        return self.get_meta("run_state", "running") or "running"

    def set_run_state(self, state: str, actor: str) -> bool:
        """Set the run state and audit it in one transaction; False when it already was ``state``."""
        if state not in RUN_STATES:
            raise ConfigError(f"run state must be one of {', '.join(RUN_STATES)}, not {state!r}")
        with self._tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key = 'run_state'").fetchone()
            if (row[0] if row else "running") == state:
                return False
            _set_run_state(c, state, time.time())
            _audit(c, actor, f"run.{state}", "")
        return True

    def run_state_row(self) -> tuple[str, float]:
        """The run state and when it was last set (0 if never: the default ``running``)."""
        return self.run_state(), float(self.get_meta("run_state_at", "0") or 0)

    def step(self) -> int:
        return int(self.get_meta("step", "0") or 0)

    # -- keys ------------------------------------------------------------------------------------
    def create_key(self, name: str, *, actor: str, expires_in: float | None = None, now: float | None = None,
                   scopes: str | tuple[str, ...] | list[str] = ("join",)) -> NewKey:
        name = name.strip()
        scopes = parse_scopes(scopes)
        if not name or len(name) > 100:
            raise ConfigError("a key needs a name of 1 to 100 characters (who it is for)")
        now = time.time() if now is None else now
        key_id, secret = generate_key()
        expires = now + expires_in if expires_in is not None else None
        with self._tx() as c:
            c.execute("INSERT INTO api_keys(id, name, hash, created, expires, updated_at, scopes) "
                      "VALUES(?, ?, ?, ?, ?, ?, ?)", (key_id, name, hash_key(secret), now, expires, now, ",".join(scopes)))
            until = f", expires {time.strftime('%Y-%m-%d %H:%M', time.gmtime(expires))} UTC" if expires else ""
            _audit(c, actor, "key.create", f"{key_id} for {name}, scope {','.join(scopes)}{until}")
        return NewKey(ApiKey(key_id, name, now, expires, scopes=scopes), secret)

    def list_keys(self) -> list[ApiKey]:
        rows = self._read(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created")
        return [_api_key(row) for row in rows]

    def revoke_key(self, id_or_prefix: str, *, actor: str, now: float | None = None) -> ApiKey:
        prefix = id_or_prefix.strip()
        if prefix.startswith("swk_"):
            prefix = key_id_of(prefix) if prefix.count("_") >= 2 else prefix[4:]
        if not prefix:
            raise ConfigError("name the key to revoke by its id (or a unique prefix of it)")
        now = time.time() if now is None else now
        with self._tx() as c:
            rows = c.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id LIKE ? ESCAPE '\\'",
                             (_like_prefix(prefix),)).fetchall()
            if not rows:
                raise ConfigError(f"no API key with id {prefix!r}; `swarm keys list` shows them")
            if len(rows) > 1:
                raise ConfigError(f"{prefix!r} matches {len(rows)} keys ({', '.join(r[0] for r in rows)}); give more of the id")
            key = _api_key(rows[0])
            if key.revoked is None:
                c.execute("UPDATE api_keys SET revoked = ?, updated_at = ? WHERE id = ?", (now, now, key.id))
                _audit(c, actor, "key.revoke", f"{key.id} of {key.name}")
                key = ApiKey(key.id, key.name, key.created, key.expires, now, key.scopes)
        return key

    def verify_key(self, full_key: str, now: float | None = None, *, scope: str | None = None) -> ApiKey:
        """The key's record if ``full_key`` is a known, unrevoked, unexpired key (with ``scope``, if
        given); else ``AuthRejected``."""
        key_id = key_id_of(full_key)
        rows = self._read(f"SELECT {_KEY_COLUMNS}, hash FROM api_keys WHERE id = ?", (key_id,))
        stored, stored_hash = (_api_key(rows[0][:6]), rows[0][6]) if rows else (None, None)
        return check_key(stored, stored_hash, full_key, time.time() if now is None else now, scope)

    def key_usable(self, key_id: str, now: float | None = None) -> bool:
        rows = self._read(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
        return bool(rows) and _api_key(rows[0]).state(time.time() if now is None else now) == "active"

    def keys_changed_at(self) -> float:
        """When a key was last created, revoked or changed (0 with no keys)."""
        return float(self._read("SELECT coalesce(max(updated_at), 0) FROM api_keys")[0][0])

    # -- sync between the bootstraps of a run (rules in bootstrap.sync) ------------------------------
    def key_rows(self) -> list["KeyRow"]:
        from bootstrap.sync import KeyRow

        rows = self._read("SELECT id, name, hash, created, expires, revoked, updated_at, scopes FROM api_keys "
                          "ORDER BY created")
        return [KeyRow(id=r[0], name=r[1], hash=r[2], created=r[3], expires=r[4], revoked=r[5], updated_at=r[6],
                       scopes=r[7]) for r in rows]

    def merge_sync(self, keys: list["KeyRow"], run_state: "RunStateRow", *, source: str,
                   banned: list[PeerId] = (), banned_at: float = 0.0) -> list[str]:
        """Fold another bootstrap's snapshot in, in one transaction; every change is audited with
        ``source`` as the actor. Returns what changed (for the log). A conflicting row (one id, two
        secrets) is kept as it is here and audited."""
        from bootstrap.sync import RunStateRow, merge_banned, merge_key, merge_run_state

        changes: list[str] = []
        with self._tx() as c:
            for remote in keys:
                local = _key_row(c, remote.id)
                try:
                    merged = merge_key(local, remote)
                except StateError as e:
                    _audit(c, source, "sync.conflict", str(e))
                    changes.append(f"conflict on {remote.id}")
                    continue
                if merged is not None:
                    _write_key_row(c, merged)
                    action = _key_change(local, merged)
                    _audit(c, source, f"sync.{action}", f"{merged.id} of {merged.name}")
                    changes.append(f"{action} {merged.id}")
            row = c.execute("SELECT key, value FROM meta WHERE key IN ('run_state', 'run_state_at')").fetchall()
            meta = dict(row)
            local_state = RunStateRow(state=meta.get("run_state", "running"), at=float(meta.get("run_state_at", 0)))
            newer = merge_run_state(local_state, run_state)
            if newer is not None:
                _set_run_state(c, newer.state, newer.at)
                if newer.state != local_state.state:
                    _audit(c, source, f"sync.run.{newer.state}", "")
                    changes.append(f"run {newer.state}")
            here, here_at = _banned(c)
            merged = merge_banned(here, list(banned))
            if merged != here or banned_at > here_at:
                _set_banned(c, merged, max(here_at, banned_at))
                for peer_id in merged:
                    if peer_id not in here:
                        _audit(c, source, "sync.peer.ban", peer_id)
                        changes.append(f"ban {peer_id[-8:]}")
        return changes

    # -- audit -----------------------------------------------------------------------------------
    def audit(self, actor: str, action: str, detail: str = "") -> None:
        with self._tx() as c:
            _audit(c, actor, action, detail)

    def audit_log(self, limit: int = 200) -> list[AuditEntry]:
        rows = self._read("SELECT id, at, actor, action, detail FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        return [AuditEntry(*row) for row in rows]

    # -- metrics and contributions ---------------------------------------------------------------
    def record_metrics(
        self, *, step: int, loss: float | None, tokens_per_second: float | None, peers: int,
        reports: dict[str, int], now: float | None = None,
    ) -> None:
        """One collection round: a history point, the step counter, and every peer's running total
        of samples folded into its tally, all in one transaction."""
        now = time.time() if now is None else now
        with self._tx() as c:
            c.execute("INSERT INTO metrics(at, step, loss, tokens_per_second, peers) VALUES(?, ?, ?, ?, ?)",
                      (now, step, loss, tokens_per_second, peers))
            row = c.execute("SELECT value FROM meta WHERE key = 'step'").fetchone()
            if step > int(row[0] if row else 0):
                c.execute("INSERT INTO meta(key, value) VALUES('step', ?) "
                          "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(step),))
            for peer_id, reported in reports.items():
                _fold_contribution(c, peer_id, reported, now)

    def add_online_steps(self, peers: list[PeerId], steps: int) -> None:
        """``steps`` more steps of the run during which each of ``peers`` was seen online (the
        ledger's credit cap, ``bootstrap.credit``). Kept as one JSON object in ``meta`` (a few
        hundred peers), so no schema change is needed."""
        with self._tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key = 'online_steps'").fetchone()
            online = json.loads(row[0]) if row else {}
            for peer in peers:
                online[peer] = int(online.get(peer, 0)) + steps
            c.execute("INSERT INTO meta(key, value) VALUES('online_steps', ?) "
                      "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (json.dumps(online),))

    def online_steps(self) -> dict[str, int]:
        return {peer: int(steps) for peer, steps in json.loads(self.get_meta("online_steps") or "{}").items()}

    def metrics_history(self, since_id: int = 0, limit: int = 1000) -> list[MetricPoint]:
        rows = self._read("SELECT id, at, step, loss, tokens_per_second, peers FROM metrics WHERE id > ? "
                          "ORDER BY id DESC LIMIT ?", (since_id, limit))
        return [MetricPoint(*row) for row in reversed(rows)]

    def record_peer_samples(self, samples: list[PeerSample], *, retention: float, now: float | None = None) -> int:
        """Add one round of peer samples and drop those older than ``retention`` seconds, in one
        transaction; returns how many were dropped."""
        now = time.time() if now is None else now
        with self._tx() as c:
            c.executemany(f"INSERT INTO peer_samples({', '.join(_SAMPLE_FIELDS)}) "
                          f"VALUES({', '.join('?' * len(_SAMPLE_FIELDS))})",
                          [tuple(getattr(s, f) for f in _SAMPLE_FIELDS) for s in samples])
            return c.execute("DELETE FROM peer_samples WHERE at < ?", (now - retention,)).rowcount

    def peer_history(self, peer_id: PeerId, since: float = 0.0, limit: int = 2000) -> list[PeerSample]:
        """``peer_id``'s samples after ``since`` (a time), oldest first, at most the newest ``limit``."""
        rows = self._read(f"SELECT {', '.join(_SAMPLE_FIELDS)} FROM peer_samples WHERE peer_id = ? AND at > ? "
                          "ORDER BY at DESC LIMIT ?", (peer_id, since, limit))
        return [PeerSample(*row) for row in reversed(rows)]

    def banned_peers(self) -> list[PeerId]:
        """Peers the owner banned or kicked (``ban_peer``), oldest first."""
        return self.banned_row()[0]

    def ban_peer(self, peer_id: PeerId, *, actor: str, action: str, detail: str = "",
                 now: float | None = None) -> bool:
        """Put ``peer_id`` on the banned list and audit ``action`` (``peer.ban`` or ``peer.kick``) in
        one transaction; False if it already was on it (audited all the same: the owner acted)."""
        peer_id = peer_id.strip()
        if not peer_id or len(peer_id) > 128:
            raise ConfigError("name the peer by its peer id (1 to 128 characters)")
        with self._tx() as c:
            banned, at = _banned(c)
            fresh = peer_id not in banned
            if fresh:
                _set_banned(c, banned + [peer_id], max(at, time.time() if now is None else now))
            _audit(c, actor, action, f"{peer_id}{': ' + detail if detail else ''}")
        return fresh

    def banned_row(self) -> tuple[list[PeerId], float]:
        """The banned list and when it last grew (0 if never): what a sync carries."""
        rows = dict(self._read("SELECT key, value FROM meta WHERE key IN ('banned_peers', 'banned_at')"))
        return _parse_banned(rows)

    def contributions(self) -> list[Contribution]:
        rows = self._read("SELECT peer_id, samples, first_seen, last_seen FROM contributions ORDER BY samples DESC")
        return [Contribution(*row) for row in rows]


_KEY_COLUMNS = "id, name, created, expires, revoked, scopes"


def _api_key(row: tuple) -> ApiKey:
    return ApiKey(*row[:5], scopes=tuple(row[5].split(",")))


def _key_row(c: sqlite3.Connection, key_id: str) -> "KeyRow | None":
    from bootstrap.sync import KeyRow

    r = c.execute("SELECT id, name, hash, created, expires, revoked, updated_at, scopes FROM api_keys WHERE id = ?",
                  (key_id,)).fetchone()
    return None if r is None else KeyRow(id=r[0], name=r[1], hash=r[2], created=r[3], expires=r[4], revoked=r[5],
                                         updated_at=r[6], scopes=r[7])


def _write_key_row(c: sqlite3.Connection, row: "KeyRow") -> None:
    c.execute("INSERT INTO api_keys(id, name, hash, created, expires, revoked, updated_at, scopes) "
              "VALUES(?, ?, ?, ?, ?, ?, ?, ?) "
              "ON CONFLICT(id) DO UPDATE SET name = excluded.name, created = excluded.created, "
              "expires = excluded.expires, revoked = excluded.revoked, updated_at = excluded.updated_at, "
              "scopes = excluded.scopes",
              (row.id, row.name, row.hash, row.created, row.expires, row.revoked, row.updated_at, row.scopes))


def _key_change(local: "KeyRow | None", merged: "KeyRow") -> str:
    if local is None:
        return "key.create" if merged.revoked is None else "key.create_revoked"
    if local.revoked is None and merged.revoked is not None:
        return "key.revoke"
    return "key.update"


def _set_run_state(c: sqlite3.Connection, state: str, at: float) -> None:
    for key, value in (("run_state", state), ("run_state_at", repr(at))):
        c.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                  (key, value))


def _fold_contribution(c: sqlite3.Connection, peer_id: PeerId, reported: int, now: float) -> None:
    row = c.execute("SELECT last_reported FROM contributions WHERE peer_id = ?", (peer_id,)).fetchone()
    if row is None:
        c.execute("INSERT INTO contributions(peer_id, samples, last_reported, first_seen, last_seen) "
                  "VALUES(?, ?, ?, ?, ?)", (peer_id, max(reported, 0), max(reported, 0), now, now))
        return
    c.execute("UPDATE contributions SET samples = samples + ?, last_reported = ?, last_seen = ? WHERE peer_id = ?",
              (contribution_delta(row[0], reported), max(reported, 0), now, peer_id))


def _banned(c: sqlite3.Connection) -> tuple[list[PeerId], float]:
    return _parse_banned(dict(c.execute("SELECT key, value FROM meta WHERE key IN ('banned_peers', 'banned_at')")
                              .fetchall()))


def _parse_banned(rows: dict[str, str]) -> tuple[list[PeerId], float]:
    return list(json.loads(rows.get("banned_peers") or "[]")), float(rows.get("banned_at") or 0)


def _set_banned(c: sqlite3.Connection, banned: list[PeerId], at: float) -> None:
    for key, value in (("banned_peers", json.dumps(banned[-512:])), ("banned_at", repr(at))):
        c.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                  (key, value))


def _audit(c: sqlite3.Connection, actor: str, action: str, detail: str) -> None:
    c.execute("INSERT INTO audit(at, actor, action, detail) VALUES(?, ?, ?, ?)",
              (time.time(), actor[:_MAX_TEXT], action[:_MAX_TEXT], detail[:_MAX_TEXT]))


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class _Transaction:
    """``with``: BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error (then re-raised; SQLite errors
    become ``StateError``)."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock):
        self._conn, self._lock = conn, lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            self._lock.release()
            raise StateError(f"cannot write the state database: {e}") from None
        return self._conn

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._conn.execute("COMMIT")
            else:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error as e:
            if exc_type is None:
                raise StateError(f"cannot write the state database: {e}") from None
        finally:
            self._lock.release()
        if isinstance(exc, sqlite3.Error):
            raise StateError(f"writing the state database failed: {exc}") from None
        return False
