"""The bootstrap's lease book: which shard a trainer gets (a table of cases), and the book over a real
SQLite file: disjoint shards, expiry hands a shard on at its committed position, only the holder moves
a lease, epochs advance when every shard is done."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootstrap.leases import LeaseBook, ShardRow, oldest_epoch, pick_shard
from bootstrap.state import StateDB
from dht.schemas import DatasetSpec
from core.errors import BadRequest, LeaseLost

NOW = 1000.0


def _row(epoch: int, shard: int, holder: str | None = None, expires: float = 0.0, done: bool = False) -> ShardRow:
    return ShardRow(epoch=epoch, shard=shard, holder=holder, expires=expires, done=done)


@pytest.mark.parametrize("rows, holder, expected", [
    ([], "a", (0, 0)),
    ([_row(0, 0, "a", NOW + 10)], "b", (0, 1)),
    ([_row(0, 0, "a", NOW + 10)], "a", (0, 0)),  # a retried request gets its own lease back
    ([_row(0, 0, "a", NOW - 1), _row(0, 1, "b", NOW + 10)], "c", (0, 0)),  # an expired lease is free
    ([_row(0, 0, None, 0.0)], "c", (0, 0)),  # a released shard is free
    ([_row(0, 0, done=True), _row(0, 1, "b", NOW + 10)], "c", (1, 0)),  # none free in epoch 0: the next epoch
    ([_row(0, 0, done=True), _row(0, 1, done=True)], "c", (1, 0)),
    ([_row(0, 0, done=True), _row(0, 1, "b", NOW + 10), _row(1, 0, "c", NOW + 10)], "d", (1, 1)),
    ([_row(0, 0, done=True), _row(0, 1, "b", NOW + 10), _row(1, 0, "c", NOW + 10), _row(1, 1, "d", NOW + 10)],
     "e", (2, 0)),
    ([_row(0, 0, done=True), _row(0, 1, done=True), _row(1, 0, "a", NOW - 5)], "b", (1, 0)),  # takeover in epoch 1
])
def test_pick_shard(rows, holder, expected):
    assert pick_shard(rows, 2, holder, NOW) == expected


@pytest.mark.parametrize("rows, ended, expected", [
    ([_row(0, 0, "a", NOW + 10)], {(0, 0)}, (0, 1)),  # read to its end: not handed back as a's own lease
    ([_row(0, 0, "a", NOW + 10), _row(0, 1, "a", NOW + 10)], {(0, 0)}, (0, 1)),  # a retry gets the new one
    ([_row(0, 0, "a", NOW + 10), _row(0, 1, "b", NOW + 10)], {(0, 0)}, (1, 0)),
])
def test_a_shard_the_trainer_has_read_to_its_end_is_not_leased_to_it_again(rows, ended, expected):
    assert pick_shard(rows, 2, "a", NOW, ended) == expected


@pytest.mark.parametrize("rows, expected", [
    ([], 0),
    ([_row(0, 0, done=True)], 0),
    ([_row(0, 0, done=True), _row(0, 1, done=True)], 1),
    ([_row(0, 0, done=True), _row(0, 1, done=True), _row(1, 1, done=True), _row(1, 0, done=True)], 2),
])
def test_oldest_epoch(rows, expected):
    assert oldest_epoch(rows, 2) == expected


class _Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def book(tmp_path: Path):
    db = StateDB(tmp_path / "state.db")
    clock = _Clock()
    yield LeaseBook(db, ttl=30.0, clock=clock), clock
    db.close()


SPEC = DatasetSpec(source="/data/corpus.jsonl", num_shards=3)


def _move(book: LeaseBook, row: ShardRow, holder: str, doc: int, offset: int = 0, **end: bool) -> float:
    return book.renew(SPEC.dataset_id, row.epoch, row.shard, holder, doc=doc, offset=offset, tokens=doc * 10,
                      step=doc, **end)


def test_trainers_get_disjoint_shards_and_a_dead_ones_shard_goes_on_from_its_position(book):
    book, clock = book
    a, b = book.lease(SPEC, "trainer-a"), book.lease(SPEC, "trainer-b")
    assert (a.shard, b.shard) == (0, 1) and a.epoch == b.epoch == 0
    assert _move(book, a, "trainer-a", 5, 7) == 30.0
    clock.now += 20
    assert _move(book, b, "trainer-b", 2) == 30.0  # b renews, a goes silent (dead)
    c = book.lease(SPEC, "trainer-c")
    assert c.shard == 2  # a's lease has not expired yet
    clock.now += 15
    d = book.lease(SPEC, "trainer-d")
    assert (d.epoch, d.shard, d.doc, d.offset, d.tokens) == (0, 0, 5, 7, 50)  # a's, at a's committed position
    with pytest.raises(LeaseLost, match="not leased to"):
        _move(book, a, "trainer-a", 6)  # a comes back: the shard is d's now
    assert book.rows(SPEC.dataset_id)[0].doc == 5


def test_positions_never_go_back_and_ending_a_lease_frees_or_finishes_the_shard(book):
    book, clock = book
    a = book.lease(SPEC, "a")
    _move(book, a, "a", 4, 2)
    _move(book, a, "a", 3)  # a late retry of an older renewal
    assert (book.rows(SPEC.dataset_id)[0].doc, book.rows(SPEC.dataset_id)[0].offset) == (4, 2)
    assert _move(book, a, "a", 4, 9, release=True) == 0.0
    again = book.lease(SPEC, "b")
    assert (again.shard, again.doc, again.offset) == (0, 4, 9)
    _move(book, again, "b", 8, done=True)
    progress = book.progress(SPEC)
    assert (progress.epoch, progress.shards_done, progress.shards_in_progress, progress.tokens) == (0, 1, 0, 80)


def test_an_epoch_ends_when_every_shard_is_done_and_the_next_starts_at_the_beginning(book):
    book, clock = book
    for shard in range(3):
        row = book.lease(SPEC, f"t{shard}")
        assert (row.epoch, row.shard) == (0, shard)
        _move(book, row, f"t{shard}", 10, done=True)
    row = book.lease(SPEC, "t0")
    assert (row.epoch, row.shard, row.doc) == (1, 0, 0)
    assert book.progress(SPEC).model_dump() | {"source": ""} == {
        "dataset_id": SPEC.dataset_id, "source": "", "num_shards": 3, "epoch": 1, "shards_done": 0,
        "shards_in_progress": 1, "tokens": 300}


def test_leases_outlive_a_restart_of_the_bootstrap(tmp_path: Path):
    db = StateDB(tmp_path / "state.db")
    row = LeaseBook(db, clock=lambda: NOW).lease(SPEC, "a")
    LeaseBook(db, clock=lambda: NOW).renew(SPEC.dataset_id, row.epoch, row.shard, "a", doc=3, offset=1, tokens=33,
                                           step=2)
    db.close()
    reopened = StateDB(tmp_path / "state.db")
    try:
        again = LeaseBook(reopened, clock=lambda: NOW + 1).lease(SPEC, "a")
        assert (again.shard, again.doc, again.offset, again.tokens, again.step) == (0, 3, 1, 33, 2)
    finally:
        reopened.close()


def test_evaluations_are_kept_in_order_and_a_bad_loss_is_refused(book):
    book, clock = book
    assert book.last_eval() is None and book.progress() is None
    book.record_eval("x", 2, 1.5, 100, "a")
    clock.now += 1
    point = book.record_eval("x", 4, 1.0, 100, "a")
    assert point.perplexity == pytest.approx(2.718281828)
    assert [(i, p.step, p.loss) for i, p in book.evals()] == [(1, 2, 1.5), (2, 4, 1.0)]
    assert [p.step for _, p in book.evals(since_id=1)] == [4]
    assert book.last_eval().step == 4
    with pytest.raises(BadRequest, match="finite"):
        book.record_eval("x", 5, float("nan"), 100, "a")


def test_the_progress_shown_without_a_run_dataset_is_the_last_one_leased(book):
    book, clock = book
    other = DatasetSpec(source="other", num_shards=2)
    book.lease(SPEC, "a")
    clock.now += 1
    book.lease(other, "b")
    assert book.progress().dataset_id == other.dataset_id
    assert book.progress(SPEC).dataset_id == SPEC.dataset_id
