"""``CheckpointStore``: the bootstrap keeps the newest checkpoint of every stage (and of the trainer's
local parts), so a stage survives the loss of every peer that served it.

Peers upload a stage's state every ``peer.checkpoint_every`` optimizer steps (``swarm.checkpoint.put``,
after a ``has`` shows the store lacks that step); a peer that claims a stage no one serves restores
from here (``get``). Checkpoints live under ``<state dir>/<run>/checkpoint-store/<part>/`` as
``peers.checkpoint_files`` writes them (atomic, the newest ``keep`` kept), so they survive a
restart of the bootstrap. The store announces itself under ``{run}_checkpoint_stores`` in the DHT.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import torch

from dht.records import SwarmDHT
from dht.schemas import RECORD_REFRESH, Manifest, StoreRecord
from peers.checkpoint_files import CheckpointDir
from peers.protocol import guarded, ok_reply, parse_request
from peers.state import StateMeta
from peers.store_protocol import (
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
from peers.transport import Handler, P2PTransport, Transport
from swarm._loop import cancel_and_wait
from swarm.errors import BadRequest, CheckpointMissing

__all__ = ["CheckpointStore"]

logger = logging.getLogger(__name__)

_KINDS = ("param", "exp_avg", "exp_avg_sq", "step")
_STORE_TTL = 4 * RECORD_REFRESH


class CheckpointStore:
    """Stores and serves the newest checkpoints of ``manifest``'s run under ``root``."""

    def __init__(self, root: Path, manifest: Manifest, *, keep: int = 2):
        self.root, self.manifest, self.keep = Path(root), manifest, keep
        self._locks: dict[str, asyncio.Lock] = {}
        self._transport: P2PTransport | None = None
        self._dht: SwarmDHT | None = None
        self._task: asyncio.Task | None = None

    def directory(self, part: str) -> CheckpointDir:
        return CheckpointDir(self.root / part, keep=self.keep)

    def latest_step(self, part: str) -> int | None:
        steps = self.directory(part).steps()
        return steps[-1] if steps else None

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self, dht: SwarmDHT) -> None:
        """Serve the RPCs on ``dht``'s p2p daemon and announce this store in the DHT."""
        self._dht = dht
        self._transport = P2PTransport(await dht.dht.replicate_p2p())
        await self.register(self._transport)
        await self._announce()
        self._task = asyncio.create_task(self._announce_forever(), name="checkpoint-store-announce")
        logger.info("keeping the run's checkpoints in %s", self.root)

    async def register(self, transport: Transport) -> None:
        for method, handler in self.handlers().items():
            await transport.serve(method, handler, max_request_bytes=None)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._transport is not None:
            await self._transport.close()
            self._transport = None

    async def _announce(self) -> None:
        record = StoreRecord(peer_id=self._dht.peer_id, maddrs=self._dht.visible_maddrs())
        if not await self._dht.announce_store(record, ttl=_STORE_TTL):
            logger.warning("the DHT did not store the checkpoint store's record (retrying)")

    async def _announce_forever(self) -> None:
        while True:
            await asyncio.sleep(RECORD_REFRESH)
            try:
                await self._announce()
            except Exception as e:  # a DHT hiccup must not stop the store; the next round retries
                logger.warning("announcing the checkpoint store failed: %s", e)

    # -- RPCs -------------------------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        return {
            CHECKPOINT_HAS: guarded(self.rpc_has, logger),
            CHECKPOINT_PUT: guarded(self.rpc_put, logger),
            CHECKPOINT_GET: guarded(self.rpc_get, logger),
        }

    async def rpc_has(self, message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        request = parse_request(HasRequest, message)
        step = await asyncio.to_thread(self.latest_step, request.part)
        return ok_reply(HasResponse(part=request.part, step=step)), []

    async def rpc_put(self, message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        request = parse_request(PutRequest, message)
        self._check_put(request, tensors)
        meta = request.meta
        async with self._lock(meta.part):
            held = await asyncio.to_thread(self.latest_step, meta.part)
            if held is not None and held >= meta.step:
                return ok_reply(PutResponse(part=meta.part, step=meta.step, stored=False)), []
            await asyncio.to_thread(self.directory(meta.part).save, meta, dict(zip(request.names, tensors)))
        logger.info("stored checkpoint of %s at step %d", meta.part, meta.step)
        return ok_reply(PutResponse(part=meta.part, step=meta.step, stored=True)), []

    async def rpc_get(self, message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        request = parse_request(GetRequest, message)
        async with self._lock(request.part):
            step = await asyncio.to_thread(self.latest_step, request.part)
            if step is None:
                raise CheckpointMissing(f"this store holds no checkpoint of {request.part}")
            meta, state = await asyncio.to_thread(self.directory(request.part).load, step)
        names = list(state)
        return ok_reply(GetResponse(meta=meta, names=names)), [state[name] for name in names]

    def _check_put(self, request: PutRequest, tensors: list[torch.Tensor]) -> None:
        meta, manifest = request.meta, self.manifest
        _check_identity(meta, manifest)
        if len(request.names) != len(tensors) or len(set(request.names)) != len(tensors):
            raise BadRequest(f"put names {len(request.names)} distinct tensors but carries {len(tensors)}")
        for name, tensor in zip(request.names, tensors):
            kind, _, rest = name.partition("/")
            if kind not in _KINDS or not rest:
                raise BadRequest(f"tensor name {name!r} is not <{'|'.join(_KINDS)}>/<parameter>")
            if kind == "param" and str(tensor.dtype).removeprefix("torch.") != meta.dtype:
                raise BadRequest(f"{name} is {tensor.dtype}, the checkpoint says {meta.dtype}")

    def _lock(self, part: str) -> asyncio.Lock:
        return self._locks.setdefault(part, asyncio.Lock())


def _check_identity(meta: StateMeta, manifest: Manifest) -> None:
    if meta.run_id != manifest.run_id or meta.config_hash != manifest.config_hash:
        raise BadRequest(f"the checkpoint is of run {meta.run_id!r} (config {meta.config_hash[:12]}), this store "
                         f"keeps run {manifest.run_id!r} (config {manifest.config_hash[:12]})")
    if meta.stage is not None:
        if meta.stage >= manifest.num_stages or meta.layers != manifest.stages[meta.stage]:
            raise BadRequest(f"the run has no stage {meta.stage} with layers {meta.layers}")


