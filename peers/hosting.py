"""``StageHost``: the stages a serving peer holds and what it announces for them.

Each served stage is a ``StageSlot``: its own record (``{run}_stage_{i}``, with ``throughput`` the
peer's share per stage, ``min(compute / k, network)`` for ``k`` stages, as placement counts it), its
executor, optimizer and averager (replicas of a stage average under ``{run}_stage{i}``), its state
adopted from a live replica on join or move, and its checkpoints (``peers.slot``). The host loads
and drops slots and announces their records. Which slot answers a request is ``peers.dispatch``'s,
when to change the span ``peers.rebalancing``'s, which stages to host for delegators
``peers.delegate_host``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Callable, Collection

import torch
from hivemind.utils import get_dht_time

from dht.bans import banned_peers
from dht.records import SwarmDHT
from dht.schemas import Manifest, PeerRecord, PeerState
from net.auth import RunAuth
from peers.training.averaging import HivemindGradientSync
from peers.state.checkpoint_files import CheckpointDir
from peers.state.checkpoints import Checkpointer
from peers.training.client import StageClient
from peers.training.executor import StageExecutor
from peers.telemetry.hardware import compute_threads, probe_hardware, release_free_memory
from peers.inference.sessions import InferenceSessions
from peers.inference.service import InferenceService
from peers.joining.measure import Measurement
from peers.state.recovery import adopt_state
from peers.training.service import StageService
from peers.slot import StageSlot
from peers.state.snapshot import StateIdentity, part_name
from peers.state.store_client import StoreClient
from peers.telemetry.publisher import PeerTelemetry
from net.transport import P2PTransport, Transport
from shards.devices import compute_dtype
from shards.placement import Span
from shards.source import resolve_model
from shards.stage import load_stage
from core.config import SwarmSettings
from core.errors import ModelLoadError
from core.types import StageIndex

__all__ = ["StageHost", "span_layers"]

logger = logging.getLogger(__name__)

def span_layers(manifest: Manifest, span: Span) -> str:
    """The layers of ``span`` as a half-open range, for the logs."""
    return f"[{manifest.stages[span.start].start}, {manifest.stages[span.end].end})"


class StageHost:
    """The slots of this peer's own span (``slots``, by stage, in order), the stages it hosts for
    delegators (``hosted``) and the records of stages a move has claimed but not loaded yet
    (``pending``). ``moving`` is true while a move swaps slots: requests are refused meanwhile.

    Made once the peer has joined and measured itself; ``close`` releases every slot."""

    def __init__(self, settings: SwarmSettings, dht: SwarmDHT, manifest: Manifest, measurement: Measurement, *,
                 stage_bytes: list[int], memory: int, transport: P2PTransport, auth: RunAuth | None,
                 replica_transport: Callable[[], Transport], telemetry: PeerTelemetry,
                 gone: Callable[[], Collection[str]], on_step_failed: Callable[[int], None],
                 device: torch.device = torch.device("cpu"), offload_optimizer: bool = False):
        """``transport`` serves; ``replica_transport()`` calls other peers' gated handlers (a replica's
        state); ``gone()``: peers known dead (their records outlive them), never a source of state;
        ``on_step_failed(stage)``: a step's averaging round failed on that stage. Stages load onto
        ``device`` (float32 masters computing in the run's dtype); ``offload_optimizer`` keeps their
        AdamW state in host memory."""
        self.device, self.offload_optimizer = device, offload_optimizer
        self.precision = compute_dtype(manifest.dtype)
        self.settings, self.dht, self.manifest, self.measurement = settings, dht, manifest, measurement
        self.stage_bytes, self.memory = stage_bytes, memory
        self.transport, self.replica_transport, self.telemetry = transport, replica_transport, telemetry
        self._auth, self._gone, self._on_step_failed = auth, gone, on_step_failed
        self.slots: dict[int, StageSlot] = {}
        self.hosted: dict[int, StageSlot] = {}
        self.pending: list[PeerRecord] = []
        self.moving = False
        self._past_steps: dict[int, int] = {}

    @property
    def peer_id(self) -> str:
        return self.dht.peer_id

    @property
    def span(self) -> Span | None:
        return Span(next(iter(self.slots)), len(self.slots)) if self.slots else None

    @property
    def identity(self) -> StateIdentity:
        return StateIdentity(run_id=self.settings.run_id, config_hash=self.manifest.config_hash)

    # -- records ----------------------------------------------------------------------------------

    def span_records(self, span: Span, state: PeerState) -> list[PeerRecord]:
        """One record per stage of ``span``, each with this peer's share of its throughput."""
        m = self.measurement
        return [PeerRecord(
            peer_id=self.peer_id, maddrs=self.dht.visible_maddrs(), stage=stage, layers=self.manifest.stages[stage],
            state=state, hardware=probe_hardware(self.device), throughput=m.per_stage(span.count),
            latency_ms=m.latency_ms,
            bandwidth_mbps=m.bandwidth_mbps, memory_gib=m.memory_gib, compute=m.compute or m.throughput,
            network=m.network if m.network is not None and m.network != float("inf") else None,
            access_token=self._auth.token if self._auth is not None else None,  # keyed runs refuse records without
        ) for stage in span.stages]

    def current_record(self, slot: StageSlot) -> PeerRecord:
        """The slot's record with the stage's current optimizer step, so trainers can tell which step it is at,
        and this peer's current addresses (a peer behind NAT changes relays)."""
        if slot.service is not None and slot.record.step != slot.service.executor.optimizer_step:
            slot.record = slot.record.model_copy(update={"step": slot.service.executor.optimizer_step})
        maddrs = self.dht.visible_maddrs()
        if slot.record.maddrs != maddrs:
            slot.record = slot.record.model_copy(update={"maddrs": maddrs})
        return slot.record

    async def announce(self, record: PeerRecord) -> None:
        """Publish ``record`` (current hardware, load and token added) and keep it as its slot's record;
        a stage this peer no longer serves (a move took it away meanwhile) is not announced."""
        record = self.telemetry.refresh(record)
        if self._auth is not None:  # the current token: it is renewed at half-life
            record = record.model_copy(update={"access_token": self._auth.token})
        slot = self.slots.get(record.stage)
        if slot is None:
            return
        slot.record = record
        if not await self.dht.announce(record):
            logger.warning("the DHT did not store this peer's record for stage %d (will retry on the next refresh)",
                           record.stage)

    async def announce_online(self) -> None:
        for slot in list(self.slots.values()):
            await self.announce(self.current_record(slot).model_copy(update={"state": PeerState.ONLINE}))

    async def announce_draining(self, stages: Collection[int]) -> None:
        """Trainers stop routing to ``stages`` (a move leaves them)."""
        for stage in stages:
            slot = self.slots[stage]
            await self.announce(self.current_record(slot).model_copy(update={"state": PeerState.DRAINING}))

    async def refresh(self) -> None:
        """Announce every record again (before it expires), the claimed ones included."""
        for slot in list(self.slots.values()):
            await self.announce(self.current_record(slot))
        for record in list(self.pending):
            await self.dht.announce(record)

    async def withdraw_all(self) -> None:
        """Withdraw every record of this peer's span and claims, each within 5 s: leaving early is
        fine, a record expires anyway."""
        for record in [slot.record for slot in self.slots.values()] + self.pending:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.dht.withdraw(record), 5)

    # -- claiming, loading, dropping --------------------------------------------------------------

    async def claim_stages(self, span: Span) -> None:
        """Announce ``loading`` for every stage of ``span`` (a slot each, nothing loaded yet) and
        withdraw the claim on stages of an earlier claim that ``span`` leaves out."""
        for stage in [stage for stage in self.slots if stage not in span.stages]:
            await self.dht.withdraw(self.slots.pop(stage).record)
        claimed = get_dht_time()
        for record in self.span_records(span, PeerState.LOADING):
            record = record.model_copy(update={"claimed": claimed})
            self.slots[record.stage] = StageSlot(record.stage, record, queue_size=self.settings.peer.queue_size)
            await self.announce(record)
        self.slots = dict(sorted(self.slots.items()))

    async def serve_span(self, span: Span, stages: Collection[int] | None = None) -> None:
        """Load every stage of ``span`` (or only ``stages`` of it: a move keeps the others as they are;
        each slot exists, announced ``loading``) with its averager, then adopt each stage's current
        state. All averagers start before any state download opens a stream (an averager that forks a
        process, ``peer.averager_process``, closes its copies of open streams, see
        ``peers.training.averaging``, but a span's own downloads need not test that). Free heap goes back
        to the system before the averagers start and at the end (see ``release_free_memory``)."""
        stages = list(span.stages) if stages is None else sorted(stages)
        release_free_memory()
        for stage in stages:
            await self.load_slot(self.slots[stage])
        for stage in stages:
            slot = self.slots[stage]
            await self.adopt_state(slot)  # never serve stale weights
            self.start_checkpoints(slot)
            slot.inference = self._serve_inference(slot)
        release_free_memory()

    async def change_span(self, span: Span, added: Collection[int]) -> None:
        """Swap to ``span``: drop the stages it leaves out (withdrawn, closed), give the kept ones this
        peer's share of the new span, load the ``pending`` ones (``added``). Requests are refused
        while the slots change (``moving``)."""
        self.moving = True
        try:
            for stage in [stage for stage in self.slots if stage not in span.stages]:
                slot = self.slots.pop(stage)
                self._past_steps[stage] = slot.service.executor.optimizer_step  # its last ledger window still ends
                await self.dht.withdraw(slot.record)
                await slot.close()
            for record in self.span_records(span, PeerState.ONLINE):  # a kept stage's share changes with the span
                if record.stage in self.slots:
                    slot = self.slots[record.stage]
                    slot.record = slot.record.model_copy(update={"throughput": record.throughput})
            for record in self.pending:
                self.slots[record.stage] = StageSlot(record.stage, record, queue_size=self.settings.peer.queue_size)
            self.slots = dict(sorted(self.slots.items()))
            self.pending = []
            await self.serve_span(span, added)
        finally:
            self.moving = False

    async def online_replicas(self, stage: StageIndex, reads: int = 4) -> list[str]:
        """The other online replicas of ``stage``, those at the newest step first. A DHT read under load can miss a key's entries (seen:
        a newcomer found no replica of a stage that had one and started from the model files), so
        once the run has trained (a trainer past step 0) an empty read is repeated, bounded, before
        the stage is taken to have no replica; a new run's first peers start at once."""
        for attempt in range(1, reads + 1):
            records = [r for r in await self.dht.stage_records(stage)
                       if r.state == PeerState.ONLINE and r.peer_id != self.peer_id]
            random.shuffle(records)  # replicas at the same step share the downloads
            replicas = [r.peer_id for r in sorted(records, key=lambda r: -r.step)]  # the current step first
            if replicas or attempt == reads:
                return replicas
            if attempt == 1 and not any(t.step > 0 for t in await self.dht.trainer_records()):
                return replicas
            logger.info("stage %d: no online replica in the DHT (read %d/%d); reading again", stage, attempt, reads)
            await asyncio.sleep(0.5 * 2 ** (attempt - 1))
        raise AssertionError("unreachable: the last read returns")

    async def load_slot(self, slot: StageSlot) -> None:
        """The slot's module, averager (prefix ``{run}_stage{i}``: every replica of the stage), executor
        and service."""
        stage = slot.stage
        module = await slot.run(self._load, stage)
        prefix = f"{self.manifest.run_id}_stage{stage}".replace(".", "_")  # hivemind: no dots in a prefix
        slot.sync = await asyncio.to_thread(HivemindGradientSync, self.dht.dht, prefix, list(module.parameters()),
                                            round_timeout=self.settings.peer.averaging_timeout,
                                            clip=self.settings.peer.averaging_clip,
                                            in_process=not self.settings.peer.averager_process)
        executor = StageExecutor(
            module, stage, self.manifest.stages[stage], self.manifest.optimizer,
            cache_size=self.settings.peer.cache_size, sync=slot.sync,
            averaging_timeout=self.settings.peer.averaging_timeout, max_abs=self.settings.peer.max_abs_value,
            precision=self.precision, offload_optimizer=self.offload_optimizer,
        )
        executor.corrupt = self.settings.peer.corrupt
        slot.service = StageService(executor, self.peer_id, worker=slot.worker, identity=self.identity)
        slot.service.on_step_failed = self._on_step_failed
        slot.service.reach_members = self.transport.reach

    def _load(self, stage: StageIndex) -> torch.nn.Module:
        manifest = self.manifest
        torch.set_num_threads(compute_threads(self.settings.peer.threads))
        if self.device.type == "cuda":  # the current GPU is per thread: this slot's compute thread uses this one
            torch.cuda.set_device(self.device)
        source = resolve_model(manifest.model)
        if source.config_hash != manifest.config_hash:
            raise ModelLoadError(
                f"{manifest.model} here has config hash {source.config_hash[:12]}, the run expects "
                f"{manifest.config_hash[:12]}: a different model or revision"
            )
        return load_stage(source, manifest.stages[stage], dtype=torch.float32, device=self.device)

    async def adopt_state(self, slot: StageSlot) -> None:
        """Before serving: the current state from a live replica, else the newest checkpoint (see peers.state.recovery)."""
        executor = slot.service.executor
        banned = await banned_peers(self.dht)  # a replica caught returning wrong results is no source
        gone = set(self._gone())  # killed: records outlive them
        replicas = [p for p in await self.online_replicas(executor.stage) if p not in banned and p not in gone]
        source = await adopt_state(
            executor, self.identity, replicas=replicas, client=StageClient(self.replica_transport()),
            store=self._store_client(), local=self._checkpoint_dir(executor.stage), compute=slot.run,
        )
        logger.info("stage %d starts at optimizer step %d (state from %s)", executor.stage,
                    executor.optimizer_step, source)

    def _checkpoint_dir(self, stage: StageIndex) -> CheckpointDir:
        root = self.settings.state_dir.expanduser() / self.settings.run_id / "checkpoints" / part_name(stage)
        return CheckpointDir(root, keep=self.settings.peer.checkpoint_keep)

    def _store_client(self) -> StoreClient:
        return StoreClient(self.replica_transport(), self.dht.stores)

    def start_checkpoints(self, slot: StageSlot) -> None:
        """Checkpoint a served stage (the task ends with the slot)."""
        executor = slot.service.executor
        slot.checkpointer = Checkpointer(
            executor, self.identity, local=self._checkpoint_dir(executor.stage), store=self._store_client(),
            every=self.settings.peer.checkpoint_every, compute=slot.run,
        )
        slot.checkpoint_task = asyncio.create_task(slot.checkpointer.run(), name=f"stage{slot.stage}-checkpoints")

    def _serve_inference(self, slot: StageSlot) -> InferenceService:
        """Generation sessions (KV caches) on a served stage's module, on its compute thread; they end
        with the stage."""
        peer, executor = self.settings.peer, slot.service.executor
        sessions = InferenceSessions(executor.module, executor.stage, executor.layers,
                                     memory_budget=int(peer.inference_memory), idle_timeout=peer.session_timeout,
                                     precision=self.precision)
        inference = InferenceService(sessions, slot.worker)
        inference.start()
        return inference

    # -- what the peer serves now -----------------------------------------------------------------

    def checkpointers(self) -> list[Checkpointer]:
        return [slot.checkpointer for slot in self.slots.values() if slot.checkpointer is not None]

    def served_executors(self) -> list[tuple[StageExecutor, Callable]]:
        """The stages this peer serves now (hosted ones included), each with its compute thread (none
        of its own span while it moves)."""
        slots = [*self.slots.values(), *self.hosted.values()]
        return [(slot.service.executor, slot.run) for slot in slots if slot.service is not None]

    def step_of(self, stage: StageIndex) -> int:
        """The optimizer step of ``stage``: a served stage's now, a stage left by a move its last one."""
        slot = self.slots.get(stage)
        if slot is not None and slot.service is not None:
            return slot.service.executor.optimizer_step
        return self._past_steps.get(stage, 0)

    async def stop_checkpoints(self) -> None:
        for slot in [*self.slots.values(), *self.hosted.values()]:
            await slot.stop_checkpoints()

    async def close(self) -> None:
        """Release every slot, own and hosted."""
        for slot in [*self.slots.values(), *self.hosted.values()]:
            await slot.close()
        self.hosted.clear()
