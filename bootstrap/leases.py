"""``LeaseBook``: the run's data shards, who reads which, and how far each is, in ``state.db``.

A dataset (``DatasetSpec``) is cut into ``num_shards`` shards, read once per epoch. A shard of an
epoch is *free* (no row yet, or its holder's lease expired or was released), *leased* (its holder
renews it with its committed position before ``ttl`` runs out) or *done*. A trainer asking for a
lease gets its own live lease back (a retried request), else the first free shard of the oldest
unfinished epoch, else of a later epoch: trainers never wait, and no two read the same shard of an
epoch at once. A shard taken over (its holder died or left) is read on from the position its last
holder committed. Only the holder moves or ends a lease (``LeaseLost`` for anyone else).

The decisions are pure (``pick_shard``, ``oldest_epoch``); ``LeaseBook`` applies them in one
transaction each, so two trainers asking at once cannot be given the same shard.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

from bootstrap.state import StateDB
from dht.schemas import DataProgress, DatasetSpec, EvalPoint
from core.errors import BadRequest, LeaseLost
from core.types import PeerId

__all__ = ["ShardRow", "LeaseBook", "pick_shard", "oldest_epoch", "DEFAULT_LEASE_TTL"]

DEFAULT_LEASE_TTL = 60.0


@dataclass(frozen=True)
class ShardRow:
    """One shard of one epoch as the book keeps it; ``doc``/``offset``/``tokens``/``step``: the
    committed position (``peers.data.protocol.Position``)."""

    epoch: int
    shard: int
    holder: PeerId | None = None
    expires: float = 0.0
    done: bool = False
    doc: int = 0
    offset: int = 0
    tokens: int = 0
    step: int = 0

    def free(self, now: float) -> bool:
        return not self.done and (self.holder is None or self.expires <= now)

    def live(self, now: float) -> bool:
        return not self.done and self.holder is not None and self.expires > now


def oldest_epoch(rows: Sequence[ShardRow], num_shards: int) -> int:
    """The first epoch with a shard not done (an epoch with no rows has none done)."""
    done: dict[int, int] = {}
    for row in rows:
        done[row.epoch] = done.get(row.epoch, 0) + row.done
    epoch = 0
    while done.get(epoch, 0) >= num_shards:
        epoch += 1
    return epoch


def pick_shard(rows: Sequence[ShardRow], num_shards: int, holder: PeerId, now: float,
               ended: Collection[tuple[int, int]] = ()) -> tuple[int, int]:
    """``(epoch, shard)`` to lease to ``holder``: its own live lease, else the first free shard of the
    oldest epoch that has one (there always is one: an epoch after every row's is all free). Never one
    of ``ended``: shards ``holder`` has read to the end and is about to commit as done."""
    for row in rows:
        if row.holder == holder and row.live(now) and (row.epoch, row.shard) not in ended:
            return row.epoch, row.shard
    by_key = {(row.epoch, row.shard): row for row in rows}
    last = max((row.epoch for row in rows), default=0)
    for epoch in range(oldest_epoch(rows, num_shards), last + 2):
        for shard in range(num_shards):
            row = by_key.get((epoch, shard))
            if (row is None or row.free(now)) and (epoch, shard) not in ended:
                return epoch, shard
    raise AssertionError("unreachable: the epoch after the last row's has no rows")


class LeaseBook:
    """Leases, positions and evaluations of the run's datasets in ``db``. ``clock``: wall time
    (leases outlive a restart of the bootstrap, so they are kept in seconds since the epoch)."""

    def __init__(self, db: StateDB, *, ttl: float = DEFAULT_LEASE_TTL, clock: Callable[[], float] = time.time):
        self.db, self.ttl, self._clock = db, ttl, clock

    def lease(self, spec: DatasetSpec, holder: PeerId, ended: Collection[tuple[int, int]] = ()) -> ShardRow:
        """Lease a shard of ``spec`` to ``holder`` (see the module doc; ``ended``: see ``pick_shard``);
        the row, position included."""
        now, key = self._clock(), spec.dataset_id
        with self.db.transaction() as c:
            c.execute("INSERT INTO data_sets(dataset_id, spec, last_used) VALUES(?, ?, ?) ON CONFLICT(dataset_id) "
                      "DO UPDATE SET last_used = excluded.last_used", (key, spec.model_dump_json(), now))
            rows = _rows(c.execute(_SELECT + " WHERE dataset_id = ?", (key,)).fetchall())
            epoch, shard = pick_shard(rows, spec.num_shards, holder, now, ended)
            c.execute("INSERT INTO data_shards(dataset_id, epoch, shard, holder, expires) VALUES(?, ?, ?, ?, ?) "
                      "ON CONFLICT(dataset_id, epoch, shard) DO UPDATE SET holder = excluded.holder, "
                      "expires = excluded.expires", (key, epoch, shard, holder, now + self.ttl))
            row = _rows(c.execute(_SELECT + " WHERE dataset_id = ? AND epoch = ? AND shard = ?",
                                  (key, epoch, shard)).fetchall())[0]
        return row

    def renew(self, dataset_id: str, epoch: int, shard: int, holder: PeerId, *, doc: int, offset: int, tokens: int,
              step: int, done: bool = False, release: bool = False) -> float:
        """Commit ``holder``'s position (never backwards: a late retry of an older renewal moves
        nothing) and extend its lease, or end it (``done``, ``release``). Seconds the lease lasts now."""
        now = self._clock()
        with self.db.transaction() as c:
            found = _rows(c.execute(_SELECT + " WHERE dataset_id = ? AND epoch = ? AND shard = ?",
                                    (dataset_id, epoch, shard)).fetchall())
            if not found or found[0].holder != holder:
                owner = "nobody" if not found or found[0].holder is None else f"{found[0].holder[-8:]}"
                raise LeaseLost(f"shard {shard} of epoch {epoch} of dataset {dataset_id} is not leased to "
                                f"{holder[-8:]} (held by {owner}): its lease expired and was given on")
            row = found[0]
            if (doc, offset) >= (row.doc, row.offset):
                c.execute("UPDATE data_shards SET doc = ?, doc_offset = ?, tokens = ?, step = ? WHERE dataset_id = ? "
                          "AND epoch = ? AND shard = ?", (doc, offset, tokens, step, dataset_id, epoch, shard))
            ended = done or release
            c.execute("UPDATE data_shards SET holder = ?, expires = ?, done = max(done, ?) WHERE dataset_id = ? "
                      "AND epoch = ? AND shard = ?", (None if ended else holder, 0.0 if ended else now + self.ttl,
                                                      int(done), dataset_id, epoch, shard))
        return 0.0 if ended else self.ttl

    def record_eval(self, dataset_id: str, step: int, loss: float, tokens: int, peer_id: PeerId) -> EvalPoint:
        if not math.isfinite(loss) or loss < 0:
            raise BadRequest(f"an evaluation loss must be a finite number >= 0, got {loss}")
        now = self._clock()
        with self.db.transaction() as c:
            c.execute("INSERT INTO evals(at, dataset_id, step, loss, tokens, peer_id) VALUES(?, ?, ?, ?, ?, ?)",
                      (now, dataset_id, step, loss, tokens, peer_id))
        return _eval_point(step, loss, tokens, now)

    def rows(self, dataset_id: str) -> list[ShardRow]:
        return _rows(self.db.query(_SELECT + " WHERE dataset_id = ? ORDER BY epoch, shard", (dataset_id,)))

    def progress(self, preferred: DatasetSpec | None = None) -> DataProgress | None:
        """How far ``preferred`` (the run's dataset) is, else the dataset leased from most recently."""
        spec = preferred
        if spec is None:
            found = self.db.query("SELECT spec FROM data_sets ORDER BY last_used DESC LIMIT 1")
            if not found:
                return None
            spec = DatasetSpec.model_validate_json(found[0][0])
        rows, now = self.rows(spec.dataset_id), self._clock()
        epoch = oldest_epoch(rows, spec.num_shards)
        return DataProgress(
            dataset_id=spec.dataset_id, source=spec.source[-500:], num_shards=spec.num_shards, epoch=epoch,
            shards_done=sum(r.done for r in rows if r.epoch == epoch),
            shards_in_progress=sum(r.live(now) for r in rows), tokens=sum(r.tokens for r in rows),
        )

    def evals(self, since_id: int = 0, limit: int = 1000) -> list[tuple[int, EvalPoint]]:
        """``(id, point)`` of evaluations after ``since_id``, oldest first (the dashboard's chart)."""
        found = self.db.query("SELECT id, step, loss, tokens, at FROM evals WHERE id > ? ORDER BY id LIMIT ?",
                              (since_id, limit))
        return [(row[0], _eval_point(*row[1:])) for row in found]

    def last_eval(self) -> EvalPoint | None:
        found = self.db.query("SELECT step, loss, tokens, at FROM evals ORDER BY id DESC LIMIT 1")
        return _eval_point(*found[0]) if found else None


_SELECT = "SELECT epoch, shard, holder, expires, done, doc, doc_offset, tokens, step FROM data_shards"


def _rows(found: list[tuple]) -> list[ShardRow]:
    return [ShardRow(epoch=e, shard=s, holder=h, expires=x, done=bool(d), doc=doc, offset=o, tokens=t, step=st)
            for e, s, h, x, d, doc, o, t, st in found]


def _eval_point(step: int, loss: float, tokens: int, at: float) -> EvalPoint:
    return EvalPoint(step=step, loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=tokens, at=at)
