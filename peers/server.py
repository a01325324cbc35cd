"""``Peer``: a serving peer's whole life: join the DHT, claim a stage, load it, serve, leave.

    async with Peer(settings) as peer:       # joined, loaded, announced online
        await peer.wait_closed()             # until stop() (Ctrl+C / SIGTERM in the CLI)

``start`` and ``stop`` are idempotent; ``stop`` withdraws the record, removes the handlers and shuts
the DHT process and its p2pd down, so nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from concurrent.futures import ThreadPoolExecutor

import torch

from dht.records import SwarmDHT
from dht.schemas import RECORD_REFRESH, Manifest, PeerRecord, PeerState
from peers.averaging import HivemindGradientSync
from peers.checkpoint_files import CheckpointDir
from peers.checkpoints import Checkpointer
from peers.client import StageClient
from peers.executor import StageExecutor
from peers.hardware import measure_throughput, probe_hardware
from peers.recovery import adopt_state
from peers.inference import InferenceSessions
from peers.inference_service import InferenceService
from peers.routing import coverage
from peers.service import StageService
from peers.state import StateIdentity, part_name
from peers.store_client import StoreClient
from peers.transport import P2PTransport
from shards.assignment import choose_stage
from shards.source import resolve_model
from shards.stage import load_stage
from swarm.config import SwarmSettings
from swarm.errors import ConfigError, ModelLoadError

__all__ = ["Peer"]

logger = logging.getLogger(__name__)


class Peer:
    """One volunteer serving one stage of a run."""

    def __init__(self, settings: SwarmSettings, *, manifest_timeout: float = 60.0):
        self.settings = settings
        self.manifest_timeout = manifest_timeout
        self.dht: SwarmDHT | None = None
        self.manifest: Manifest | None = None
        self.record: PeerRecord | None = None
        self.service: StageService | None = None
        self.inference: InferenceService | None = None
        self._transport: P2PTransport | None = None
        self._refresh_task: asyncio.Task | None = None
        self._sync: HivemindGradientSync | None = None
        self._checkpoint_task: asyncio.Task | None = None
        self.checkpointer: Checkpointer | None = None
        self._closed = asyncio.Event()
        self._started = False
        # every torch call of this peer runs on this one thread (see StageService)
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")

    @property
    def peer_id(self) -> str:
        assert self.dht is not None, "the peer has not started"
        return self.dht.peer_id

    @property
    def maddrs(self) -> list[str]:
        return self.dht.visible_maddrs() if self.dht else []

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        net = self.settings.network
        if not net.initial_peers:
            raise ConfigError("a peer needs --bootstrap (or network.initial_peers) to find the swarm")
        self.dht = await asyncio.to_thread(
            SwarmDHT.create, self.settings.run_id, initial_peers=net.initial_peers, host=net.host,
            port=net.port, announce_host=net.announce_host,
        )
        self.manifest = await self.dht.wait_manifest(self.manifest_timeout)
        stage = await self._choose_stage(self.manifest)
        layers = self.manifest.stages[stage]
        logger.info("claiming stage %d, layers %s of %s", stage, layers, self.manifest.model)
        await self._announce(PeerRecord(peer_id=self.peer_id, maddrs=self.maddrs, stage=stage, layers=layers,
                                        hardware=probe_hardware()))
        module = await self._in_compute(self._load, self.manifest, stage)
        throughput = await self._in_compute(measure_throughput, module, module.hidden_size)
        # started now, before any request stream is open: a process forked later would inherit the
        # open streams' sockets and keep them from closing (their replies would never end)
        prefix = f"{self.manifest.run_id}_stage{stage}".replace(".", "_")  # hivemind: no dots in a prefix
        self._sync = sync = await asyncio.to_thread(HivemindGradientSync, self.dht.dht, prefix, list(module.parameters()))
        executor = StageExecutor(
            module, stage, layers, self.manifest.optimizer, cache_size=self.settings.peer.cache_size,
            sync=sync, averaging_timeout=self.settings.peer.averaging_timeout,
        )
        identity = StateIdentity(run_id=self.settings.run_id, config_hash=self.manifest.config_hash)
        self.service = StageService(executor, self.peer_id, worker=self._compute, identity=identity)
        self._transport = P2PTransport(await self.dht.dht.replicate_p2p())
        await self._adopt_state(executor, identity)
        await self.service.register(self._transport)
        await self._serve_inference(module, stage, layers)
        await self._announce(self.record.model_copy(update={
            "state": PeerState.ONLINE, "throughput": throughput, "hardware": probe_hardware(),
            "step": executor.optimizer_step}))
        self._refresh_task = asyncio.create_task(self._refresh_forever(), name="peer-record-refresh")
        self._start_checkpoints(executor, identity)
        logger.info("serving stage %d (layers %s) at %.0f tokens/s", stage, layers, throughput)

    async def _serve_inference(self, module: torch.nn.Module, stage: int, layers) -> None:
        peer = self.settings.peer
        sessions = InferenceSessions(module, stage, layers, memory_budget=int(peer.inference_memory),
                                     idle_timeout=peer.session_timeout)
        self.inference = InferenceService(sessions, self._compute)
        await self.inference.register(self._transport)

    async def _choose_stage(self, manifest: Manifest) -> int:
        pinned = self.settings.peer.stage
        if pinned is not None:
            if pinned >= manifest.num_stages:
                raise ConfigError(f"stage {pinned} does not exist: the run has {manifest.num_stages} stages")
            return pinned
        records = await self.dht.all_records(manifest.num_stages)
        return choose_stage(coverage(manifest.num_stages, records), rng=random.Random())

    def _load(self, manifest: Manifest, stage: int) -> torch.nn.Module:
        if self.settings.peer.threads:
            torch.set_num_threads(self.settings.peer.threads)
        source = resolve_model(manifest.model)
        if source.config_hash != manifest.config_hash:
            raise ModelLoadError(
                f"{manifest.model} here has config hash {source.config_hash[:12]}, the run expects "
                f"{manifest.config_hash[:12]}: a different model or revision"
            )
        return load_stage(source, manifest.stages[stage], dtype=getattr(torch, manifest.dtype))

    def _checkpoint_dir(self, stage: int) -> CheckpointDir:
        root = self.settings.state_dir.expanduser() / self.settings.run_id / "checkpoints" / part_name(stage)
        return CheckpointDir(root, keep=self.settings.peer.checkpoint_keep)

    def _store_client(self) -> StoreClient:
        return StoreClient(self._transport, self.dht.stores)

    async def _adopt_state(self, executor: StageExecutor, identity: StateIdentity) -> None:
        """Before serving: the current state from a live replica, else the newest checkpoint (see peers.recovery)."""
        records = await self.dht.stage_records(executor.stage)
        replicas = [r.peer_id for r in records if r.state == PeerState.ONLINE and r.peer_id != self.peer_id]
        source = await adopt_state(
            executor, identity, replicas=replicas, client=StageClient(self._transport),
            store=self._store_client(), local=self._checkpoint_dir(executor.stage), compute=self._in_compute,
        )
        logger.info("stage %d starts at optimizer step %d (state from %s)", executor.stage,
                    executor.optimizer_step, source)

    def _start_checkpoints(self, executor: StageExecutor, identity: StateIdentity) -> None:
        self.checkpointer = Checkpointer(
            executor, identity, local=self._checkpoint_dir(executor.stage), store=self._store_client(),
            every=self.settings.peer.checkpoint_every, compute=self._in_compute,
        )
        self._checkpoint_task = asyncio.create_task(self.checkpointer.run(), name="stage-checkpoints")

    def _current_record(self) -> PeerRecord:
        """The record with the stage's current optimizer step, so trainers can tell which step it is at."""
        if self.service is not None and self.record.step != self.service.executor.optimizer_step:
            self.record = self.record.model_copy(update={"step": self.service.executor.optimizer_step})
        return self.record

    async def _announce(self, record: PeerRecord) -> None:
        self.record = record
        if not await self.dht.announce(record):
            logger.warning("the DHT did not store this peer's record (will retry on the next refresh)")

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(RECORD_REFRESH)
            try:
                await self._announce(self._current_record())
            except Exception as e:  # a DHT hiccup must not stop serving; the next refresh retries
                logger.warning("refreshing the DHT record failed: %s", e)

    async def stop(self, *, final_checkpoint: bool = True) -> None:
        """Withdraw from the DHT and release everything. Safe to call more than once. With
        ``final_checkpoint`` the steps since the last checkpoint are saved and uploaded first (bounded)."""
        if self._closed.is_set():
            return
        for task in (self._refresh_task, self._checkpoint_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if final_checkpoint and self.checkpointer is not None:
            await self.checkpointer.final(timeout=60.0)
        if self.dht is not None and self.record is not None:
            with contextlib.suppress(Exception):  # leaving early is fine: the record expires anyway
                await asyncio.wait_for(self.dht.withdraw(self.record), 5)
        if self.inference is not None:
            await self.inference.stop()
        if self._transport is not None:
            await self._transport.shutdown()
            with contextlib.suppress(Exception):
                await self._transport.p2p.shutdown()
        if self.service is not None:
            self.service.shutdown()
        elif self._sync is not None:  # stopped between starting the averager and serving
            self._sync.shutdown()
        await asyncio.to_thread(self._compute.shutdown, wait=True, cancel_futures=True)
        if self.dht is not None:
            await asyncio.to_thread(self.dht.shutdown)
        self._closed.set()
        logger.info("peer stopped")

    async def _in_compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn, *args)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> "Peer":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
