"""The trainer's stub for the run's data leases (``swarm.data.*``), at the run's primary bootstrap."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from dht.control import get_bootstraps
from dht.records import SwarmDHT
from dht.schemas import DatasetSpec
from net.rpc import Message, parse_reply
from net.transport import Transport
from peers.data.protocol import DATA_EVAL, DATA_LEASE, DATA_RENEW, EvalRequest, EvalResponse, Lease, LeaseRequest
from peers.data.protocol import Position, RenewRequest, RenewResponse
from core.errors import PeerUnavailable
from core.types import PeerId

__all__ = ["DataClient", "ServiceSource", "find_data_service"]

logger = logging.getLogger(__name__)

ServiceSource = Callable[[], Awaitable[PeerId]]
"""Returns the peer that keeps the run's leases (``find_data_service`` in real use)."""


async def find_data_service(dht: SwarmDHT) -> PeerId:
    """The run's primary bootstrap (signed by the run's authority): it alone keeps the leases, so two
    trainers never hold the same shard from two bootstraps' separate books."""
    primaries = [record.peer_id for record, _ in await get_bootstraps(dht) if record.role == "primary"]
    if not primaries:
        raise PeerUnavailable(f"no primary bootstrap of run {dht.run_id!r} is live: the run's data shards are "
                              "leased there")
    return primaries[0]


class DataClient:
    """Leases, renews and ends shards, and reports evaluations. Every call is tried ``attempts``
    times with backoff while the bootstrap is unreachable: a lease request from a trainer that already
    holds a lease returns that lease, a renewal sets a position (the same one twice is a no-op)."""

    def __init__(self, transport: Transport, service: ServiceSource, *, timeout: float = 30.0, attempts: int = 4,
                 backoff: float = 0.5):
        self.transport, self._service = transport, service
        self.timeout, self.attempts, self.backoff = timeout, attempts, backoff

    async def lease(self, spec: DatasetSpec, ended: list[tuple[int, int]] = ()) -> Lease:
        """A shard of ``spec``; ``ended``: ``(epoch, shard)`` this trainer has read to the end, not those."""
        return parse_reply(Lease, await self._call(DATA_LEASE, LeaseRequest(spec=spec, ended=list(ended))))

    async def renew(self, lease: Lease, position: Position, *, done: bool = False, release: bool = False) -> float:
        """Commit ``position``; the seconds the lease now lasts. ``LeaseLost`` if it is not ours anymore."""
        request = RenewRequest(dataset_id=lease.dataset_id, epoch=lease.epoch, shard=lease.shard, position=position,
                               done=done, release=release)
        return parse_reply(RenewResponse, await self._call(DATA_RENEW, request)).ttl

    async def report_eval(self, dataset_id: str, step: int, loss: float, tokens: int) -> float:
        """Hand an evaluation to the bootstrap (status, dashboard, Prometheus); its perplexity."""
        request = EvalRequest(dataset_id=dataset_id, step=step, loss=loss, tokens=tokens)
        return parse_reply(EvalResponse, await self._call(DATA_EVAL, request)).perplexity

    async def _call(self, method: str, request: Message):
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                peer_id = await self._service()
                reply, _ = await self.transport.call(peer_id, method, request, [], timeout=self.timeout)
                return reply
            except PeerUnavailable as e:
                if attempt == self.attempts:
                    raise
                logger.warning("%s, attempt %d/%d: %s; trying again in %.1f s", method, attempt, self.attempts, e,
                               delay)
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable: the last attempt returns or raises")
