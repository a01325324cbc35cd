"""``AssignedBatches``: batches from the data shards the run leases to this trainer, for any loop.

    with AssignedBatches.for_model(model, spec, batch_size=8, seq_len=128) as data:
        for input_ids in itertools.islice(data, steps):
            model(input_ids, labels=input_ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            data.commit(model.step)

The bootstrap leases a shard of the dataset to this trainer (``bootstrap.leases``); the batches are
its documents packed into sequences (``swarm.text_data.Packer``), and when it ends the next shard is
leased, epoch after epoch. ``commit`` after each step tells the bootstrap how far the batches trained
so far reach (the lease's *position*, kept with the run's step): a trainer that takes the shard over
(this one dead, or gone) reads on from there. A background renewal keeps the lease alive between
commits; ``close`` gives the shard back at its committed position. A batch not committed is read
again by the next holder: a batch is trained at most once per epoch unless its trainer died before
committing it, when its gradients may not have reached the step either.

A commit travels while the next batch trains: ``commit`` sends it and returns, and waits only for
the commit before it (one in flight), so a step pays the bootstrap's round trip only when that
commit outlasted a whole step. What it cost: a trainer that dies with a commit in flight loses that
commit as it would have lost it a moment earlier, and a lease lost to another trainer (the bootstrap
answers ``LeaseLost``) is dropped from the next batch on instead of from this one. ``committed`` and
``spans`` are read after the commit in flight is answered (``flush`` waits for it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import dataclass
from typing import Any, Callable, Coroutine, Iterator, TypeVar

import torch

from dht.schemas import DatasetSpec
from peers.data.client import DataClient, find_data_service
from peers.data.protocol import Lease, Position
from core.errors import ConfigError, LeaseLost, SwarmError
from swarm.text import TextCodec
from swarm.text_data import Packer, open_split, sample_ids, shard_texts

__all__ = ["AssignedBatches", "Span"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Span:
    """What this trainer read of shard ``shard`` of ``epoch`` and committed: from ``start`` to ``end``."""

    epoch: int
    shard: int
    start: Position
    end: Position

    def sample_ids(self, num_shards: int) -> list[int]:
        return sample_ids(self.shard, num_shards, self.start, self.end)

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "start": [self.start.doc, self.start.offset],
                "end": [self.end.doc, self.end.offset], "tokens": self.end.tokens - self.start.tokens}


class AssignedBatches:
    """An endless iterator of ``[batch_size, seq_len]`` token batches from leased shards of ``spec``.
    ``run`` runs a coroutine on the network loop and waits for it; ``submit`` starts one there."""

    def __init__(self, client: DataClient, spec: DatasetSpec, codec: TextCodec, *, batch_size: int, seq_len: int,
                 run: Callable[[Coroutine[Any, Any, T]], T], submit: Callable[[Coroutine], Any]):
        self.client, self.spec, self.codec = client, spec, codec
        self.batch_size, self.seq_len = batch_size, seq_len
        self._run, self._submit = run, submit
        self._data = open_split(spec)
        self.lease: Lease | None = None  # as granted; ``committed`` is how far it is now
        self._committed: Position | None = None
        self._packer: Packer | None = None
        self._read: Position | None = None  # after the last batch handed out
        self._yielded = False  # the current shard gave a sequence
        self._empty = 0  # shards in a row that gave none
        self._ended: list[tuple[Lease, Position]] = []  # shards read to their end, not yet committed
        self._lost: Lease | None = None
        self._spans: list[Span] = []
        self._heartbeat: Any = None
        self._pending: concurrent.futures.Future | None = None  # the commit in flight: what it did not commit

    @property
    def committed(self) -> Position | None:
        """How far the current shard is committed, once the commit in flight is answered."""
        self.flush()
        return self._committed

    @property
    def spans(self) -> list[Span]:
        """What was read and committed of each shard, once the commit in flight is answered."""
        self.flush()
        return self._spans

    @classmethod
    def for_model(cls, model: Any, spec: DatasetSpec, *, batch_size: int, seq_len: int) -> "AssignedBatches":
        """For a ``SwarmModelForCausalLM``: its transport and loop, its tokenizer (or bytes)."""
        from swarm.serving import codec_of

        client = DataClient(model.pipeline.client.transport, lambda: find_data_service(model.dht))
        return cls(client, spec, codec_of(model), batch_size=batch_size, seq_len=seq_len,
                   run=lambda coro: model.loop.run(coro, timeout=300), submit=model.submit)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self._pending is not None and self._pending.done():
            self.flush()
        rows: list[list[int]] = []
        while len(rows) < self.batch_size:
            if self._packer is not None and self._lost is self.lease:
                logger.warning("shard %d was given to another trainer; leasing another", self.lease.shard)
                self._packer = None
            if self._packer is None:
                self._open_shard()
            packed = self._packer.next()
            if packed is None:
                self._shard_ended()
                continue
            rows.append(packed.tokens)
            self._read, self._yielded = packed.position, True
        return torch.tensor(rows, dtype=torch.long)

    def _shard_ended(self) -> None:
        self._empty = 0 if self._yielded else self._empty + 1
        if self._empty > self.spec.num_shards:
            raise ConfigError(f"dataset {self.spec.source} holds no sequence of {self.seq_len} tokens in any "
                              "shard: lower --seq-len or the number of shards")
        self._ended.append((self.lease, self._packer.position))
        self._packer = None

    def _open_shard(self) -> None:
        self.flush()  # the shards it ends must be known ended before the next is leased
        self.lease = self._run(self.client.lease(self.spec, [(lease.epoch, lease.shard) for lease, _ in self._ended]))
        start = self.lease.position
        logger.info("reading shard %d/%d of epoch %d of %s from document %d", self.lease.shard, self.spec.num_shards,
                    self.lease.epoch, self.spec.source, start.doc)
        self._packer = Packer(shard_texts(self._data, self.spec, self.lease.shard, start.doc), self.codec,
                              self.seq_len, start=start)
        self._read, self._committed, self._yielded = start, start, False
        self._spans.append(Span(self.lease.epoch, self.lease.shard, start, start))
        if self._heartbeat is None:
            self._heartbeat = self._submit(self._renew_forever())

    def commit(self, step: int) -> None:
        """The batches handed out so far are trained (``step``: the run's step now): commit their
        position, and end the shards they read to the end. Sent without waiting for the answer
        (after the commit before it is answered)."""
        self.flush()
        ended, self._ended = self._ended, []
        commits = [(lease, end.model_copy(update={"step": step}), True) for lease, end in ended]
        if self.lease is not None and self._packer is not None and self._read is not None:
            commits.append((self.lease, self._read.model_copy(update={"step": step}), False))
        if commits:
            self._pending = self._submit(self._commit_all(commits))

    def flush(self, timeout: float = 300.0) -> None:
        """Wait for the commit in flight and take in its outcome: the shards it could not end wait
        for the next commit."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._ended[:0] = pending.result(timeout)

    async def _commit_all(self, commits: list[tuple[Lease, Position, bool]]) -> list[tuple[Lease, Position]]:
        """Commit each position in order; returns the ended shards that could not be committed."""
        return [(lease, position) for lease, position, done in commits
                if not await self._commit(lease, position, done=done) and done]

    async def _commit(self, lease: Lease, position: Position, *, done: bool) -> bool:
        """Commit ``position``; False when the bootstrap could not be reached (the next commit carries
        a newer position; training goes on while the bootstrap is away, within the lease's TTL)."""
        try:
            await self.client.renew(lease, position, done=done)
        except LeaseLost as e:
            logger.warning("%s", e)
            self._lost = lease
            return True
        except SwarmError as e:
            logger.warning("committing the position in shard %d failed (kept for the next commit): %s",
                           lease.shard, e)
            return False
        span = next(s for s in reversed(self._spans) if (s.epoch, s.shard) == (lease.epoch, lease.shard))
        span.end = position
        if lease is self.lease:
            self._committed = position
        return True

    async def _renew_forever(self) -> None:
        """Keep the current lease alive between commits (a step can outlast the lease's TTL)."""
        while True:
            lease = self.lease
            await asyncio.sleep(lease.ttl / 3)
            if lease is not self.lease or lease is self._lost or self._packer is None:
                continue
            try:
                await self.client.renew(lease, self._committed)
            except LeaseLost as e:
                logger.warning("%s", e)
                self._lost = lease
            except SwarmError as e:  # the bootstrap is away for a moment: the next round tries again
                logger.warning("renewing the lease of shard %d failed: %s", lease.shard, e)

    def close(self) -> None:
        """Give the current shard back at its committed position (another trainer reads on from
        there). Idempotent."""
        self.flush()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        lease, self._packer = self.lease, None
        if lease is not None and lease is not self._lost:
            self.lease = None
            try:
                self._run(self.client.renew(lease, self._committed, release=True))
            except SwarmError as e:  # it expires on its own after the TTL
                logger.warning("releasing shard %d failed (it expires in %.0f s): %s", lease.shard, lease.ttl, e)

    def __enter__(self) -> "AssignedBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
