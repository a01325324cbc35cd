"""``AssignedBatches`` against the bootstrap's real lease service (``DataService`` over a ``LeaseBook`` in
SQLite) through the in-memory transport, with the faults a run meets: the bootstrap away during a
commit, a lease lost to another trainer, shards and epochs running out."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from bootstrap.data import DataService
from bootstrap.leases import LeaseBook
from bootstrap.state import StateDB
from dht.schemas import DatasetSpec
from net.transport import InMemoryTransport
from peers.data.client import DataClient
from peers.data.protocol import DATA_RENEW
from core.errors import PeerUnavailable
from core.loop import LoopThread
from swarm.assigned import AssignedBatches
from swarm.text import ByteCodec

BOOTSTRAP = "bootstrap-peer"


class _Records:
    """Where the service publishes its data record: kept, so the test can read the last one."""

    peer_id = BOOTSTRAP

    def __init__(self) -> None:
        self.published = []

    async def publish_data(self, record) -> bool:
        self.published.append(record)
        return True


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def service(tmp_path: Path):
    hub, loop, db, clock, records = InMemoryTransport(), LoopThread("data-test"), StateDB(tmp_path / "state.db"), \
        _Clock(), _Records()
    book = LeaseBook(db, ttl=30.0, clock=clock)
    served = DataService(book, records, None, CollectorRegistry())
    for method, handler in served.handlers().items():
        loop.run(hub.bind(BOOTSTRAP).serve(method, handler))
    yield hub, loop, book, clock, records
    loop.stop()
    db.close()


def _spec(tmp_path: Path, docs: int = 12, shards: int = 2) -> DatasetSpec:
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": f"text {i:02d} " + "z" * 12}) + "\n" for i in range(docs)))
    return DatasetSpec(source=str(path), num_shards=shards)


def _trainer(hub: InMemoryTransport, loop: LoopThread, name: str, spec: DatasetSpec) -> AssignedBatches:
    async def service() -> str:
        return BOOTSTRAP

    client = DataClient(hub.bind(name), service, timeout=5.0, attempts=1)
    return AssignedBatches(client, spec, ByteCodec(), batch_size=2, seq_len=10, run=lambda c: loop.run(c, timeout=30),
                           submit=lambda c: asyncio.run_coroutine_threadsafe(c, loop.loop))


def test_a_commit_while_the_bootstrap_is_away_is_carried_by_the_next(service, tmp_path: Path):
    hub, loop, book, clock, records = service
    spec = _spec(tmp_path)
    with _trainer(hub, loop, "a", spec) as data:
        next(data)
        data.commit(1)
        data.flush()
        hub.fail[BOOTSTRAP] = PeerUnavailable("the bootstrap restarts")
        next(data)
        data.commit(2)  # logged, not raised: training goes on
        data.flush()
        assert book.rows(spec.dataset_id)[0].step == 1
        del hub.fail[BOOTSTRAP]
        next(data)
        data.commit(3)
        data.flush()
        row = book.rows(spec.dataset_id)[0]
        assert (row.step, row.tokens) == (3, 3 * 2 * 10) and (row.doc, row.offset) == (data.committed.doc,
                                                                                     data.committed.offset)
    assert book.rows(spec.dataset_id)[0].holder is None  # given back on close
    assert records.published[-1].progress.tokens == 60 and records.published[-1].progress.shards_in_progress == 0


def test_a_lease_lost_to_another_trainer_is_dropped_for_a_new_shard(service, tmp_path: Path):
    hub, loop, book, clock, records = service
    spec = _spec(tmp_path, shards=3)
    a = _trainer(hub, loop, "a", spec)
    next(a)
    a.commit(1)
    a.flush()
    a._heartbeat.cancel()  # a stalls: no renewals for longer than its lease
    clock.now += 31
    b = _trainer(hub, loop, "b", spec)
    next(b)
    assert (b.lease.shard, b.lease.position.doc) == (a.lease.shard, a.committed.doc)  # taken over where a was
    next(a)
    a.commit(2)  # LeaseLost: a drops the shard...
    a.flush()
    next(a)  # ...and reads a shard of its own
    assert a.lease.shard not in (0,) and b.lease.shard == 0
    assert [(s.shard, s.end.tokens) for s in a.spans] == [(0, 20), (a.lease.shard, 0)]
    b.close()
    a.close()


def test_shards_read_to_the_end_are_done_and_the_next_epoch_starts_over(service, tmp_path: Path):
    hub, loop, book, clock, records = service
    spec = _spec(tmp_path, docs=2, shards=2)  # a document of 21 tokens a shard: one batch of 2 sequences of 10
    with _trainer(hub, loop, "a", spec) as data:
        shards = []
        for step in range(1, 6):
            next(data)
            data.commit(step)
            data.flush()
            shards.append((data.lease.epoch, data.lease.shard))
    assert shards == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    rows = {(r.epoch, r.shard): r for r in book.rows(spec.dataset_id)}
    assert all(rows[key].done for key in [(0, 0), (0, 1), (1, 0), (1, 1)]) and not rows[(2, 0)].done
    assert book.progress(spec).epoch == 2


def test_a_dataset_too_short_for_one_sequence_is_an_error_not_a_loop(service, tmp_path: Path):
    hub, loop, book, clock, records = service
    path = tmp_path / "tiny.jsonl"
    path.write_text(json.dumps({"text": "hi"}) + "\n")
    with _trainer(hub, loop, "a", DatasetSpec(source=str(path), num_shards=2)) as data:
        with pytest.raises(Exception, match="no sequence of 10 tokens"):
            next(data)


def test_a_commit_travels_while_the_next_batch_is_read_and_lands_in_order(service, tmp_path: Path):
    """``commit`` returns before the bootstrap answers (the step is not held up by its round trip):
    with the bootstrap's renewals held, the trainer commits and reads its next batch; once they go
    through, the position committed is that of the step, and the next commit waited for this one."""
    hub, loop, book, clock, records = service
    spec = _spec(tmp_path)
    gate, answered = threading.Event(), []
    serve = hub._handlers[(BOOTSTRAP, DATA_RENEW)]

    async def held(message, tensors):
        await asyncio.get_running_loop().run_in_executor(None, gate.wait, 30)
        reply = await serve(message, tensors)
        answered.append(message["position"]["step"])
        return reply

    hub._handlers[(BOOTSTRAP, DATA_RENEW)] = held
    with _trainer(hub, loop, "a", spec) as data:
        next(data)
        started = time.monotonic()
        data.commit(1)
        second = next(data)
        assert time.monotonic() - started < 5 and answered == [] and second.shape == (2, 10)
        assert book.rows(spec.dataset_id)[0].step == 0  # not there yet
        gate.set()
        data.commit(2)  # waits for commit 1 first: the bootstrap sees them in order
        data.flush()
        assert answered == [1, 2]
        row = book.rows(spec.dataset_id)[0]
        assert (row.step, row.tokens) == (2, 2 * 2 * 10) and data.committed.step == 2
        assert data.spans[-1].end.tokens == 40
