"""Stubs for the run's checkpoint stores (``swarm.checkpoint.*``), found through the DHT."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import torch

from dht.schemas import StoreRecord
from net.rpc import Message, parse_reply
from peers.state.snapshot import StateMeta
from peers.state.store_protocol import (
    CHECKPOINT_GET,
    CHECKPOINT_HAS,
    CHECKPOINT_PUT,
    GetRequest,
    GetResponse,
    HasRequest,
    HasResponse,
    PutRequest,
    PutResponse,
)
from net.transport import Transport
from core.errors import CheckpointMissing, PeerUnavailable, ProtocolMismatch, SwarmError
from core.types import PeerId

__all__ = ["StoreClient", "StoreSource"]

logger = logging.getLogger(__name__)

StoreSource = Callable[[], Awaitable[list[StoreRecord]]]
"""Returns the run's checkpoint stores (``SwarmDHT.stores`` in real use)."""


class StoreClient:
    """Asks, uploads to and downloads from every checkpoint store of the run.

    Every call is retried ``attempts`` times with backoff when a store is unreachable: ``has`` and
    ``get`` change nothing, and a repeated ``put`` of a step the store already holds is a no-op.
    """

    def __init__(self, transport: Transport, stores: StoreSource, *, timeout: float = 600.0, attempts: int = 3,
                 backoff: float = 0.5):
        self.transport, self._stores = transport, stores
        self.timeout, self.attempts, self.backoff = timeout, attempts, backoff

    async def store_ids(self) -> list[str]:
        return [record.peer_id for record in await self._stores()]

    async def has(self, peer_id: PeerId, part: str) -> int | None:
        reply, _ = await self._call(peer_id, CHECKPOINT_HAS, HasRequest(part=part), [])
        return parse_reply(HasResponse, reply).step

    async def latest(self, part: str) -> tuple[str, int] | None:
        """``(store, step)`` of the newest checkpoint of ``part`` in any reachable store, or None."""
        best: tuple[str, int] | None = None
        for peer_id in await self.store_ids():
            try:
                step = await self.has(peer_id, part)
            except SwarmError as e:  # one unreachable store must not hide the others
                logger.warning("checkpoint store %s did not answer: %s", peer_id[-8:], e)
                continue
            if step is not None and (best is None or step > best[1]):
                best = (peer_id, step)
        return best

    async def put(self, meta: StateMeta, tensors: dict[str, torch.Tensor]) -> int:
        """Upload to each store that lacks this step; returns how many stores stored it."""
        stored = 0
        for peer_id in await self.store_ids():
            try:
                held = await self.has(peer_id, meta.part)
                if held is not None and held >= meta.step:
                    continue
                names = list(tensors)
                reply, _ = await self._call(peer_id, CHECKPOINT_PUT, PutRequest(meta=meta, names=names),
                                            [tensors[name] for name in names])
                stored += parse_reply(PutResponse, reply).stored
            except SwarmError as e:
                logger.warning("uploading %s step %d to store %s failed: %s", meta.part, meta.step, peer_id[-8:], e)
        return stored

    async def get(self, part: str, peer_id: PeerId | None = None) -> tuple[StateMeta, dict[str, torch.Tensor]]:
        """The newest checkpoint of ``part`` (from ``peer_id``, else from the store holding the newest)."""
        if peer_id is None:
            found = await self.latest(part)
            if found is None:
                raise CheckpointMissing(f"no checkpoint store holds a checkpoint of {part}")
            peer_id = found[0]
        reply, tensors = await self._call(peer_id, CHECKPOINT_GET, GetRequest(part=part), [], max_reply_bytes=None)
        response = parse_reply(GetResponse, reply)
        if len(response.names) != len(tensors) or len(set(response.names)) != len(tensors):
            raise ProtocolMismatch(f"checkpoint reply names {len(response.names)} tensors but carried {len(tensors)}")
        return response.meta, dict(zip(response.names, tensors))

    async def _call(self, peer_id: PeerId, method: str, request: Message, tensors: list[torch.Tensor], **options):
        for attempt in range(1, self.attempts + 1):
            try:
                return await self.transport.call(peer_id, method, request, tensors, timeout=self.timeout, **options)
            except PeerUnavailable as e:
                if attempt == self.attempts:
                    raise
                logger.warning("%s to store %s, attempt %d/%d failed: %s", method, peer_id[-8:], attempt,
                               self.attempts, e)
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
        raise AssertionError("unreachable: the last attempt returns or raises")
