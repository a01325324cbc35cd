"""``CheckpointStore``: the bootstrap keeps the newest checkpoint of every stage (and of the trainer's
local parts), so a stage survives the loss of every peer that served it.

Peers upload a stage's state every ``peer.checkpoint_every`` optimizer steps (``swarm.checkpoint.put``,
after a ``has`` shows the store lacks that step); a peer that claims a stage no one serves restores
from here (``get``). On a keyed run every RPC needs a token (the transport's gate). A put is kept
only from a peer that announces the stage itself (a trainer, for the ``local`` part), only if it is
not ahead of the run's step, and only if its tensors are exactly the part's and sane
(``peers.state.checkpoint_check``); the transport refuses an upload larger than the largest part from
its frame headers. Checkpoints live under ``<state dir>/<run>/checkpoint-store/<part>/`` as
``peers.state.checkpoint_files`` writes them (atomic, the newest ``keep`` kept), so they survive a
restart of the bootstrap. The store announces itself under ``{run}_checkpoint_stores`` in the DHT.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import torch
from transformers import PretrainedConfig

from dht.records import SwarmDHT
from dht.schemas import RECORD_REFRESH, Manifest, PeerRecord, StoreRecord, TrainerRecord
from net.admission import CallerLimits, Gate
from peers.state.checkpoint_check import check_checkpoint, part_bytes, part_module
from peers.state.checkpoint_files import CheckpointDir
from net.rpc import guarded, ok_reply, parse_request
from peers.state.snapshot import LOCAL_PART, StateIdentity, StateMeta, part_name
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
from net.transport import CALLER, Handler, P2PTransport, Transport
from shards.source import resolve_model
from core.loop import cancel_and_wait
from core.errors import AuthRejected, BadRequest, CheckpointMissing, ModelLoadError, SwarmError
from core.types import PeerId, StageIndex

__all__ = ["CheckpointStore", "RunView", "RunSource"]

logger = logging.getLogger(__name__)

_STORE_TTL = 4 * RECORD_REFRESH


@dataclass(frozen=True)
class RunView:
    """What the store checks an upload against: the run's stage records and trainer records."""

    records: dict[int, list[PeerRecord]]
    trainers: list[TrainerRecord]

    def uploader_refusal(self, caller: PeerId | None, stage: StageIndex | None) -> str | None:
        """Why ``caller`` may not upload a checkpoint of ``stage`` (None: it may). A stage's
        checkpoint comes from a peer announcing that stage, the local parts from a trainer."""
        if caller is None:
            return "the uploader is not known"
        if stage is None:
            if any(t.trainer_id == caller for t in self.trainers):
                return None
            return f"{caller[-8:]} is no trainer of this run"
        if any(r.peer_id == caller for r in self.records.get(stage, [])):
            return None
        return f"{caller[-8:]} does not serve stage {stage}"

    def step(self, stage: StageIndex | None) -> int:
        """The newest step the run's records show for ``stage`` (the local parts: the trainers')."""
        trainers = max((t.step for t in self.trainers), default=0)
        if stage is None:
            return trainers
        return max([trainers, *(r.step for r in self.records.get(stage, []))])


RunSource = Callable[[], Awaitable[RunView]]


class CheckpointStore:
    """Stores and serves the newest checkpoints of ``manifest``'s run under ``root``. ``run``
    returns what uploads are checked against (default: read from the DHT the store serves on)."""

    def __init__(self, root: Path, manifest: Manifest, *, keep: int = 2, run: RunSource | None = None,
                 config: PretrainedConfig | None = None):
        self.root, self.manifest, self.keep = Path(root), manifest, keep
        self._run = run
        self._config = config
        self._modules: dict[str, torch.nn.Module] = {}
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

    async def start(self, dht: SwarmDHT, *, gate: Gate | None = None, limits: CallerLimits | None = None) -> None:
        """Serve the RPCs on ``dht``'s p2p daemon (behind the run's ``gate`` on a keyed run) and
        announce this store in the DHT."""
        self._dht = dht
        self._transport = P2PTransport(await dht.dht.replicate_p2p(), gate=gate, limits=limits)
        await self.register(self._transport)
        await self._announce()
        self._task = asyncio.create_task(self._announce_forever(), name="checkpoint-store-announce")
        logger.info("keeping the run's checkpoints in %s", self.root)

    async def register(self, transport: Transport) -> None:
        for method, handler in self.handlers().items():
            await transport.serve(method, handler, max_request_bytes=self.max_upload_bytes())

    def max_upload_bytes(self) -> int | None:
        """The largest part's full state: no honest upload is larger (None: the model's config is
        unreadable here, and every put is refused anyway)."""
        try:
            parts = [None, *range(self.manifest.num_stages)]
            return max(part_bytes(self._module(part_name(stage))) for stage in parts)
        except SwarmError as e:
            logger.warning("checkpoints cannot be checked on this store: %s", e)
            return None

    def _module(self, part: str) -> torch.nn.Module:
        """The part on the meta device (``peers.state.checkpoint_check.part_module``), built once."""
        if part not in self._modules:
            if self._config is None:
                try:
                    self._config = resolve_model(self.manifest.model).config
                except Exception as e:  # no such dir here (a mirror on another machine), no hub access
                    raise ModelLoadError(f"this store cannot read the model config of {self.manifest.model}: "
                                         f"{type(e).__name__}: {e}") from None
            stage = None if part == LOCAL_PART else int(part.removeprefix("stage-"))
            layers = None if stage is None else self.manifest.stages[stage]
            # the masters: float32 whatever the run computes in
            self._modules[part] = part_module(self._config, "float32", layers)
        return self._modules[part]

    async def _view(self) -> RunView:
        if self._run is not None:
            return await self._run()
        records = await self._dht.all_records(self.manifest.num_stages)
        return RunView(records, await self._dht.trainer_records())

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
        await self._check_put(request, tensors, CALLER.get())
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

    async def _check_put(self, request: PutRequest, tensors: list[torch.Tensor], caller: PeerId | None) -> None:
        """Refuse (``AuthRejected``, ``BadRequest``) an upload from anyone but the part's own peer,
        ahead of the run, or not exactly the part's sane tensors (``peers.state.checkpoint_check``)."""
        meta, manifest = request.meta, self.manifest
        _check_identity(meta, manifest)
        if len(request.names) != len(tensors) or len(set(request.names)) != len(tensors):
            raise BadRequest(f"put names {len(request.names)} distinct tensors but carries {len(tensors)}")
        module = self._module(meta.part)
        view = await self._view()
        why = view.uploader_refusal(caller, meta.stage)
        if why is not None:
            raise AuthRejected(f"checkpoint of {meta.part} refused: {why}")
        identity = StateIdentity(run_id=manifest.run_id, config_hash=manifest.config_hash)
        state = dict(zip(request.names, tensors))
        await asyncio.to_thread(check_checkpoint, meta, state, module, identity, run_step=view.step(meta.stage))

    def _lock(self, part: str) -> asyncio.Lock:
        return self._locks.setdefault(part, asyncio.Lock())


def _check_identity(meta: StateMeta, manifest: Manifest) -> None:
    if meta.run_id != manifest.run_id or meta.config_hash != manifest.config_hash:
        raise BadRequest(f"the checkpoint is of run {meta.run_id!r} (config {meta.config_hash[:12]}), this store "
                         f"keeps run {manifest.run_id!r} (config {manifest.config_hash[:12]})")
    if meta.stage is not None:
        if meta.stage >= manifest.num_stages or meta.layers != manifest.stages[meta.stage]:
            raise BadRequest(f"the run has no stage {meta.stage} with layers {meta.layers}")


