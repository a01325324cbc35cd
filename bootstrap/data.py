"""``DataService``: the primary bootstrap leases the run's data shards and keeps the evaluations.

It serves ``swarm.data.lease``, ``.renew`` and ``.eval`` (``peers.data.protocol``) over the
``LeaseBook`` in ``state.db``, on the bootstrap's gated transport (a keyed run's trainers present
their token; the caller's peer id holds the lease). Every ``interval`` seconds, and when a lease
begins or ends and after each evaluation, it publishes a ``DataRecord`` (the run's data progress and
last evaluation) under ``{run}_data`` for ``swarm status`` and the dashboard, and sets the
``swarm_data_*`` and ``swarm_eval_*`` gauges of the bootstrap's Prometheus registry.

A mirror does not serve leases: two books would hand out the same shard. Trainers ask the primary
(``peers.data.client.find_data_service``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch
from hivemind.utils import get_dht_time
from prometheus_client import CollectorRegistry, Gauge

from bootstrap.leases import LeaseBook
from dht.records import SwarmDHT
from dht.schemas import RECORD_REFRESH, DataRecord, DatasetSpec, EvalPoint
from net.rpc import guarded, ok_reply, parse_request
from net.transport import CALLER, Transport
from peers.data import protocol
from core.errors import AuthRejected
from core.loop import cancel_and_wait
from core.types import PeerId

__all__ = ["DataService"]

logger = logging.getLogger(__name__)


class DataService:
    """Leases over ``book``; ``spec`` (the manifest's dataset, if any) is the one progress is shown for."""

    def __init__(self, book: LeaseBook, dht: SwarmDHT, spec: DatasetSpec | None, registry: CollectorRegistry,
                 *, interval: float = RECORD_REFRESH / 4):
        self.book, self.dht, self.spec, self.interval = book, dht, spec, interval
        self._task: asyncio.Task | None = None
        self.eval_loss = Gauge("swarm_eval_loss", "held-out loss of the last evaluation", registry=registry)
        self.eval_perplexity = Gauge("swarm_eval_perplexity", "held-out perplexity of the last evaluation",
                                     registry=registry)
        self.eval_step = Gauge("swarm_eval_step", "the run's step the last evaluation was of", registry=registry)
        self.data_epoch = Gauge("swarm_data_epoch", "the oldest epoch of the run's dataset not finished",
                                registry=registry)
        self.shards_done = Gauge("swarm_data_shards_done", "shards of that epoch read to their end", registry=registry)
        self.shards_leased = Gauge("swarm_data_shards_in_progress", "shards leased to trainers now", registry=registry)
        self.data_tokens = Gauge("swarm_data_tokens", "tokens trained on the run's dataset", registry=registry)

    async def start(self, transport: Transport) -> None:
        for method, handler in self.handlers().items():
            await transport.serve(method, handler)
        await self.publish()
        self._task = asyncio.create_task(self._publish_forever(), name="data-record")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def handlers(self) -> dict[str, Any]:
        return {protocol.DATA_LEASE: guarded(self.rpc_lease, logger),
                protocol.DATA_RENEW: guarded(self.rpc_renew, logger),
                protocol.DATA_EVAL: guarded(self.rpc_eval, logger)}

    async def rpc_lease(self, message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        request = parse_request(protocol.LeaseRequest, message)
        holder = _caller()
        row = await asyncio.to_thread(self.book.lease, request.spec, holder, set(request.ended))
        logger.info("trainer %s leases shard %d of epoch %d of %s from document %d", holder[-8:], row.shard, row.epoch,
                    request.spec.source, row.doc)
        position = protocol.Position(doc=row.doc, offset=row.offset, tokens=row.tokens, step=row.step)
        await self._publish_quietly()
        return ok_reply(protocol.Lease(dataset_id=request.spec.dataset_id, epoch=row.epoch, shard=row.shard,
                              position=position, ttl=self.book.ttl)), []

    async def rpc_renew(self, message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        request = parse_request(protocol.RenewRequest, message)
        p = request.position
        ttl = await asyncio.to_thread(self.book.renew, request.dataset_id, request.epoch, request.shard, _caller(),
                                      doc=p.doc, offset=p.offset, tokens=p.tokens, step=p.step, done=request.done,
                                      release=request.release)
        if request.done or request.release:
            await self._publish_quietly()
        return ok_reply(protocol.RenewResponse(ttl=ttl)), []

    async def rpc_eval(self, message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        request = parse_request(protocol.EvalRequest, message)
        point = await asyncio.to_thread(self.book.record_eval, request.dataset_id, request.step, request.loss,
                                        request.tokens, _caller())
        logger.info("evaluation at step %d: loss %.4f, perplexity %.2f over %d tokens", point.step, point.loss,
                    point.perplexity, point.tokens)
        await self.publish(point)
        return ok_reply(protocol.EvalResponse(perplexity=point.perplexity)), []

    async def publish(self, latest: EvalPoint | None = None) -> None:
        """The data record and the gauges, as the book stands now."""
        progress = await asyncio.to_thread(self.book.progress, self.spec)
        point = latest or await asyncio.to_thread(self.book.last_eval)
        if point is not None:
            self.eval_loss.set(point.loss)
            self.eval_perplexity.set(point.perplexity)
            self.eval_step.set(point.step)
        if progress is not None:
            self.data_epoch.set(progress.epoch)
            self.shards_done.set(progress.shards_done)
            self.shards_leased.set(progress.shards_in_progress)
            self.data_tokens.set(progress.tokens)
        record = DataRecord(peer_id=self.dht.peer_id, updated=get_dht_time(), progress=progress, eval=point)
        if not await self.dht.publish_data(record):
            logger.warning("the DHT did not store the data record (retrying)")

    async def _publish_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._publish_quietly()

    async def _publish_quietly(self) -> None:
        """``publish``, where a failure must not fail the caller (a lease that was granted)."""
        try:
            await self.publish()
        except Exception as e:  # a DHT or database hiccup: the next round retries
            logger.warning("publishing the data record failed: %s", e)


def _caller() -> PeerId:
    caller = CALLER.get()
    if caller is None:
        raise AuthRejected("a data lease needs a caller the transport identified")
    return caller
