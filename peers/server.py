"""``Peer``: a serving peer's whole life: join the DHT, measure itself, claim a stage, load it, serve,
move when that raises the swarm's bottleneck, leave.

    async with Peer(settings) as peer:       # joined, loaded, announced online
        await peer.wait_closed()             # until stop() (Ctrl+C / SIGTERM in the CLI)

``start`` and ``stop`` are idempotent; ``stop`` withdraws the record, removes the handlers and shuts
the DHT process and its p2pd down, so nothing is left running.

Placement (``shards.placement``): on join the peer measures its throughput for one stage of the model,
its links to up to three peers and its free memory (``peers.measure``), and claims the stage that
raises the bottleneck most. Every ``rebalance_period`` (randomised) it asks ``should_move``; a peer
with a move waits a delay that shrinks with its gain and asks again (so the one that gains most goes
first and the others see its claim), then moves: it announces ``loading`` for the new stage,
``draining`` for the old one (trainers stop routing to it), drains in-flight requests, loads the new
stage and announces it online. A peer serves one stage at a time (the placement functions handle spans
of several; serving several stages from one peer is not built yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

from dht.control import MetricsReport, RunState
from dht.records import SwarmDHT
from dht.schemas import RECORD_REFRESH, Manifest, PeerRecord, PeerState
from peers.averaging import HivemindGradientSync
from peers.checkpoint_files import CheckpointDir
from peers.checkpoints import Checkpointer
from peers.client import StageClient
from peers.executor import StageExecutor
from peers.hardware import probe_hardware
from peers.measure import (
    Measurement,
    Progress,
    available_memory,
    cached_stage_throughput,
    compute_device,
    measure_links,
    measure_stage,
    network_tokens_per_second,
    serve_echo,
    stage_bytes,
)
from peers.protocol import BACKWARD, FORWARD
from peers.reachability import explain_placement
from peers.routing import record_loads
from peers.auth import PRESENT, AuthedTransport, GatedTransport, RunAuth
from peers.recovery import adopt_state
from peers.resync import ResyncWatch
from peers.inference import InferenceSessions
from peers.inference_service import InferenceService
from peers.runcontrol import RunWatcher
from peers.service import StageService
from peers.state import StateIdentity, part_name
from peers.store_client import StoreClient
from peers.telemetry import PeerTelemetry
from peers.transport import P2PTransport
from shards.placement import Move, PlacedPeer, Span, choose_stages, rebalancing_needed, should_move
from shards.source import resolve_model
from shards.stage import load_stage
from swarm.config import SwarmSettings
from swarm.errors import ConfigError, ModelLoadError, PeerUnavailable

__all__ = ["Peer"]

logger = logging.getLogger(__name__)


class Peer:
    """One volunteer serving one stage of a run."""

    def __init__(self, settings: SwarmSettings, *, manifest_timeout: float = 60.0, progress: Progress | None = None):
        self.settings = settings
        self.manifest_timeout = manifest_timeout
        self.dht: SwarmDHT | None = None
        self.manifest: Manifest | None = None
        self.record: PeerRecord | None = None
        self.service: StageService | None = None
        self.measurement: Measurement | None = None
        self.moves: list[Move] = []
        self._progress = progress
        self._pending: PeerRecord | None = None  # the stage being moved to, while the old one drains
        self._stage_bytes: list[int] = []
        self._memory = 0
        self._rebalancing = False
        self._in_flight = 0
        self._last_request = 0.0
        self.inference: InferenceService | None = None
        self._transport: P2PTransport | None = None
        self._refresh_task: asyncio.Task | None = None
        self._rebalance_task: asyncio.Task | None = None
        self._sync: HivemindGradientSync | None = None
        self._checkpoint_task: asyncio.Task | None = None
        self.resync: ResyncWatch | None = None
        self.checkpointer: Checkpointer | None = None
        self._closed = asyncio.Event()
        self._started = False
        self.telemetry: PeerTelemetry | None = None
        self.claim_reason = ""
        self._past_steps: dict[int, int] = {}
        self._watcher: RunWatcher | None = None
        self._leaving: asyncio.Task | None = None
        self._auth: RunAuth | None = None
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
        self.telemetry = PeerTelemetry(self.settings, self.dht)
        self.telemetry.start_monitor()
        self.manifest = await self.dht.wait_manifest(self.manifest_timeout)
        self._auth = await RunAuth.join(self.dht, self.settings.key, on_revoked=self._on_key_revoked)
        self._transport = P2PTransport(await self.dht.dht.replicate_p2p())
        await serve_echo(self._transport)  # joining peers time their links against this one
        self.measurement = await self._measure(self.manifest)
        stage = await self._choose_stage(self.manifest)
        layers = self.manifest.stages[stage]
        logger.info("claiming stage %d, layers %s of %s", stage, layers, self.manifest.model)
        await self._announce(PeerRecord(
            peer_id=self.peer_id, maddrs=self.maddrs, stage=stage, layers=layers, hardware=probe_hardware(),
            throughput=self.measurement.throughput, latency_ms=self.measurement.latency_ms,
            bandwidth_mbps=self.measurement.bandwidth_mbps, memory_gib=self.measurement.memory_gib,
        ))
        self.service = await self._serve_stage(stage)
        self.inference = self._serve_inference(self.service)
        await self._register_handlers()
        self.telemetry.start_serving([stage], self._step_of, self._transport)
        await self._announce(self.record.model_copy(update={
            "state": PeerState.ONLINE, "hardware": probe_hardware(), "step": self.service.executor.optimizer_step}))
        self._refresh_task = asyncio.create_task(self._refresh_forever(), name="peer-record-refresh")
        self._start_checkpoints(self.service.executor)
        self.resync = ResyncWatch(self.dht.stage_records, self._served_executors, StageClient(self._replica_transport()),
                                  self._in_compute, self._identity, self.peer_id)
        self.resync.start()
        self._watcher = RunWatcher(self.dht, self._metrics_report, on_change=self._on_run_state,
                                   on_control=self._auth.follow if self._auth is not None else None)
        self._watcher.start()
        if self._may_rebalance:
            self.start_rebalancing()
        logger.info("serving stage %d (layers %s) at %.0f tokens/s", stage, layers, self.record.throughput)

    @property
    def _may_rebalance(self) -> bool:
        peer = self.settings.peer
        return peer.rebalance if peer.rebalance is not None else peer.stage is None

    # -- measuring and claiming -------------------------------------------------------------------

    async def _measure(self, manifest: Manifest) -> Measurement:
        """Compute (cached), links and memory, with progress for ``swarm join``."""
        peer = self.settings.peer
        source = await asyncio.to_thread(resolve_model, manifest.model)
        config, dtype = source.config, getattr(torch, manifest.dtype)
        device = compute_device()
        self._stage_bytes = [stage_bytes(config, layers, dtype) for layers in manifest.stages]
        self._memory = available_memory(device, int(peer.memory) if peer.memory else None)
        largest = max(manifest.stages, key=len)
        key = {"model": manifest.config_hash, "layers": len(largest), "dtype": manifest.dtype, "device": device,
               "threads": peer.threads or torch.get_num_threads(), "slowdown": peer.slowdown}
        self._report("compute", 0.0)
        compute = await self._in_compute(
            cached_stage_throughput, self.settings.state_dir.expanduser(), key,
            lambda: measure_stage(config, largest, dtype=dtype, device=device, delay=peer.slowdown))
        self._report("compute", 1.0)
        records = await self.dht.all_records(manifest.num_stages)
        others = sorted({r.peer_id for rs in records.values() for r in rs
                         if r.state == PeerState.ONLINE and r.peer_id != self.peer_id})
        random.shuffle(others)
        latency, bandwidth = await measure_links(self._transport, others[:3], progress=self._progress)
        self._report("network", 1.0)
        network = network_tokens_per_second(bandwidth, config.hidden_size, dtype)
        measurement = Measurement(throughput=round(min(compute, network), 1), latency_ms=latency,
                                  bandwidth_mbps=bandwidth, memory_gib=round(self._memory / 2**30, 2))
        logger.info("measured %.0f tokens/s for one stage on %s (compute %.0f), latency %s ms, bandwidth %s "
                    "Mbit/s, %.1f GiB for stages", measurement.throughput, device, compute, latency, bandwidth,
                    measurement.memory_gib)
        return measurement

    def _report(self, what: str, done: float) -> None:
        if self._progress is not None:
            self._progress(what, done)


    async def _choose_stage(self, manifest: Manifest) -> int:
        pinned = self.settings.peer.stage
        if pinned is not None:
            if pinned >= manifest.num_stages:
                raise ConfigError(f"stage {pinned} does not exist: the run has {manifest.num_stages} stages")
            self.claim_reason = "pinned with --stage"
            return pinned
        records = await self.dht.all_records(manifest.num_stages)
        loads = record_loads(manifest.num_stages, records, exclude=self.peer_id)
        span = choose_stages(loads, self._stage_bytes, compute=self.measurement.throughput,
                             memory_bytes=self._memory, max_stages=1, rng=random.Random())
        self.claim_reason = explain_placement(loads, span.start, self.measurement.throughput)
        return span.start

    # -- serving ----------------------------------------------------------------------------------

    async def _serve_stage(self, stage: int) -> StageService:
        """Load ``stage``, start its replicas' averager and wrap both in a service (handlers are
        registered once, see ``_dispatch``)."""
        module = await self._in_compute(self._load, self.manifest, stage)
        # the averager forks a process: started before the stage serves (see issue 4's note: a fork
        # inherits open request streams); on a move the old stage has drained by now
        prefix = f"{self.manifest.run_id}_stage{stage}".replace(".", "_")  # hivemind: no dots in a prefix
        self._sync = sync = await asyncio.to_thread(HivemindGradientSync, self.dht.dht, prefix,
                                                    list(module.parameters()),
                                                    round_timeout=self.settings.peer.averaging_timeout)
        executor = StageExecutor(
            module, stage, self.manifest.stages[stage], self.manifest.optimizer,
            cache_size=self.settings.peer.cache_size, sync=sync, averaging_timeout=self.settings.peer.averaging_timeout,
        )
        service = StageService(executor, self.peer_id, worker=self._compute, identity=self._identity)
        await self._adopt_state(executor, self._identity)  # never serve stale weights, on join or on a move
        return service

    def _serve_inference(self, service: StageService) -> InferenceService:
        """Generation sessions (KV caches) on the served stage's module; they end with the stage."""
        peer, executor = self.settings.peer, service.executor
        sessions = InferenceSessions(executor.module, executor.stage, executor.layers,
                                     memory_budget=int(peer.inference_memory), idle_timeout=peer.session_timeout)
        inference = InferenceService(sessions, self._compute)
        inference.start()
        return inference

    async def _register_handlers(self) -> None:
        """Once: the handlers dispatch to whichever stage this peer serves now. A keyed run lets only
        callers that presented a token through. Telemetry counts what passes the gate (a refused call is
        no work): the observed transport wraps the gated one."""
        transport = self._transport
        if self._auth is not None:
            await self._transport.serve(PRESENT, self._auth.gate.rpc_present)
            transport = GatedTransport(self._transport, self._auth.gate)
            self._auth.start()
        transport = self.telemetry.observe(transport)
        for method in self.service.handlers():
            await transport.serve(method, self._dispatch(method, lambda: self.service))
        for method in self.inference.handlers():
            await transport.serve(method, self._dispatch(method, lambda: self.inference))

    def _step_of(self, stage: int) -> int:
        """The optimizer step of ``stage``: the served stage's now, a stage left by a move its last one."""
        service = self.service
        if service is not None and service.executor.stage == stage:
            return service.executor.optimizer_step
        return self._past_steps.get(stage, 0)

    def _dispatch(self, method: str, current: Callable[[], StageService | InferenceService | None]) -> Callable:
        """A handler that forwards to whichever service (``current()``) this peer runs now (a move swaps
        it), counts requests in flight for draining, and adds the configured artificial slowdown."""
        slowdown = self.settings.peer.slowdown if method in (FORWARD, BACKWARD) else 0.0

        async def handler(message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
            service = current()
            if service is None:
                raise PeerUnavailable(f"peer {self.peer_id[-8:]} is moving to another stage")
            self._in_flight += 1
            self._last_request = time.monotonic()
            try:
                if slowdown:
                    await asyncio.sleep(slowdown)
                return await service.handlers()[method](message, tensors)
            finally:
                self._in_flight -= 1
                self._last_request = time.monotonic()

        return handler

    # -- rebalancing ------------------------------------------------------------------------------

    def start_rebalancing(self) -> None:
        """Re-evaluate this peer's stage every ``rebalance_period`` (started on join unless the stage is
        pinned; a pinned peer may be let loose later). Idempotent."""
        if self._rebalance_task is None:
            self._rebalance_task = asyncio.create_task(self._rebalance_forever(), name="peer-rebalance")

    async def _rebalance_forever(self) -> None:
        period, rng = self.settings.peer.rebalance_period, random.Random()
        while True:
            await asyncio.sleep(period * rng.uniform(0.5, 1.5))
            try:
                move = await self.consider_move()
                if move is None:
                    continue
                # the peer that gains most goes first: the others wait longer, then see its claim
                await asyncio.sleep(period * 0.5 * rng.random() / (1 + min(move.gain, 3.0)))
                move = await self.consider_move()
                if move is not None and await self._claim(move, settle=min(2.0, period / 4)):
                    await self.move_to(move)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a failed check or move must not stop serving; the next period retries
                logger.warning("rebalancing failed: %s: %s", type(e).__name__, e)

    async def _claim(self, move: Move, *, settle: float) -> bool:
        """Announce ``loading`` for the new stage, give other claims ``settle`` seconds to show, and keep
        the claim only if the move still holds with every other claim counted. Two peers that claimed
        the same hole at the same moment both back off (and draw new random times): a claim that
        survives this check is the only one."""
        self._pending = self.record.model_copy(update={
            "stage": move.new.start, "layers": self.manifest.stages[move.new.start], "state": PeerState.LOADING})
        await self.dht.announce(self._pending)
        await asyncio.sleep(settle)
        again = await self.consider_move()
        if again is not None and again.new == move.new:
            return True
        logger.info("another peer claimed stage %d first; staying on stage %d", move.new.start, self.record.stage)
        await self.dht.withdraw(self._pending)
        self._pending = None
        return False

    async def consider_move(self) -> Move | None:
        """``should_move`` on the current DHT records, with this peer counted as it serves now."""
        manifest, record = self.manifest, self.record
        records = await self.dht.all_records(manifest.num_stages)
        loads = record_loads(manifest.num_stages, records, exclude=self.peer_id)
        loads[record.stage] += record.throughput
        peer = self.settings.peer
        self._rebalancing = rebalancing_needed(loads, peer.rebalance_margin, self._rebalancing)
        me = PlacedPeer(self.peer_id, record.throughput, Span(record.stage))
        return should_move(loads, self._stage_bytes, me, memory_bytes=self._memory, margin=peer.rebalance_margin,
                           active=self._rebalancing, max_stages=1)

    async def move_to(self, move: Move) -> None:
        """Leave the old stage for ``move.new``: claim the new one (so no other peer moves for the same
        hole), stop taking work for the old one and drain it, load the new one, announce it online."""
        old, new_stage = self.record, move.new.start
        logger.info("moving from stage %d to %d: bottleneck %.0f -> %.0f tokens/s", old.stage, new_stage,
                    move.bottleneck_before, move.bottleneck_after)
        if self._pending is None or self._pending.stage != new_stage:
            self._pending = old.model_copy(update={"stage": new_stage, "layers": self.manifest.stages[new_stage],
                                                   "state": PeerState.LOADING})
            await self.dht.announce(self._pending)
        await self._announce(old.model_copy(update={"state": PeerState.DRAINING}))
        await self._drain()
        await self.dht.withdraw(self.record)
        previous, self.service = self.service, None
        sessions, self.inference = self.inference, None
        self._past_steps[old.stage] = previous.executor.optimizer_step  # its last ledger window still ends
        await sessions.stop()  # open generation sessions end with the stage; their clients re-open elsewhere
        previous.shutdown()
        self.service = await self._serve_stage(new_stage)
        self.inference = self._serve_inference(self.service)
        self.telemetry.follow_stage(new_stage)
        self.claim_reason = (f"moved from stage {old.stage}: bottleneck {move.bottleneck_before:.0f} -> "
                             f"{move.bottleneck_after:.0f} tokens/s")
        self._start_checkpoints(self.service.executor)
        self.record, self._pending = self._pending, None
        await self._announce(self._current_record().model_copy(update={"state": PeerState.ONLINE}))
        self.moves.append(move)
        logger.info("now serving stage %d (layers %s)", new_stage, self.record.layers)

    async def _drain(self) -> None:
        """Serve the old stage for ``drain_seconds`` (trainers refresh their routes and stop sending),
        then until nothing is in flight and a second passed without a request; at most 30 s more."""
        peer = self.settings.peer
        await asyncio.sleep(peer.drain_seconds)
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if self._in_flight == 0 and time.monotonic() - self._last_request >= 1.0:
                return
            await asyncio.sleep(0.1)
        logger.warning("stage %d still had %d request(s) in flight after draining; leaving anyway",
                       self.record.stage, self._in_flight)

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
            executor, identity, replicas=replicas, client=StageClient(self._replica_transport()),
            store=self._store_client(), local=self._checkpoint_dir(executor.stage), compute=self._in_compute,
        )
        logger.info("stage %d starts at optimizer step %d (state from %s)", executor.stage,
                    executor.optimizer_step, source)

    def _served_executors(self) -> list[StageExecutor]:
        """The stages this peer serves now (none while it moves between stages)."""
        return [self.service.executor] if self.service is not None else []

    def _replica_transport(self) -> AuthedTransport | P2PTransport:
        """For calls to other peers' gated handlers (a replica's state): on a keyed run they present
        this peer's token first, as a trainer does, else the replica refuses them."""
        return self._transport if self._auth is None else AuthedTransport(self._transport, self._auth.token_text)

    @property
    def _identity(self) -> StateIdentity:
        return StateIdentity(run_id=self.settings.run_id, config_hash=self.manifest.config_hash)

    def _start_checkpoints(self, executor: StageExecutor) -> None:
        """Checkpoint the stage served now (a move replaces the task with one for the new stage)."""
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
        self.checkpointer = Checkpointer(
            executor, self._identity, local=self._checkpoint_dir(executor.stage), store=self._store_client(),
            every=self.settings.peer.checkpoint_every, compute=self._in_compute,
        )
        self._checkpoint_task = asyncio.create_task(self.checkpointer.run(), name="stage-checkpoints")

    def _current_record(self) -> PeerRecord:
        """The record with the stage's current optimizer step, so trainers can tell which step it is at."""
        if self.service is not None and self.record.step != self.service.executor.optimizer_step:
            self.record = self.record.model_copy(update={"step": self.service.executor.optimizer_step})
        return self.record

    async def _announce(self, record: PeerRecord) -> None:
        if self.telemetry is not None:
            record = self.telemetry.refresh(record)
        if self._auth is not None:  # the current token: it is renewed at half-life
            record = record.model_copy(update={"access_token": self._auth.token})
        self.record = record
        if not await self.dht.announce(record):
            logger.warning("the DHT did not store this peer's record (will retry on the next refresh)")

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(RECORD_REFRESH)
            try:
                await self._announce(self._current_record())
                if self._pending is not None:
                    await self.dht.announce(self._pending)
            except Exception as e:  # a DHT hiccup must not stop serving; the next refresh retries
                logger.warning("refreshing the DHT record failed: %s", e)

    async def stop(self, *, final_checkpoint: bool = True) -> None:
        """Withdraw from the DHT and release everything. Safe to call more than once. With
        ``final_checkpoint`` the steps since the last checkpoint are saved and uploaded first (bounded)."""
        if self._closed.is_set():
            return
        if self._watcher is not None:
            await self._watcher.stop()
        if self._auth is not None:
            await self._auth.stop()
        if self.resync is not None:
            await self.resync.stop()
        for task in (self._refresh_task, self._checkpoint_task, self._rebalance_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if final_checkpoint and self.checkpointer is not None:
            await self.checkpointer.final(timeout=60.0)
        if self.telemetry is not None:  # first: its last ledger window still goes out over the transport
            await self.telemetry.stop()
        for record in (self.record, self._pending):
            if self.dht is not None and record is not None:
                with contextlib.suppress(Exception):  # leaving early is fine: the record expires anyway
                    await asyncio.wait_for(self.dht.withdraw(record), 5)
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

    def _metrics_report(self) -> MetricsReport | None:
        """This peer's running total of samples (backwards) for the bootstrap's contribution tally."""
        if self.service is None or self.record is None:
            return None
        executor = self.service.executor
        samples = executor.optimizer_step * self.manifest.target_batch_size + executor.accumulated_samples
        return MetricsReport(peer_id=self.peer_id, role="peer", step=executor.optimizer_step,
                             samples=samples, stage=self.record.stage,
                             access_token=self._auth.token if self._auth is not None else None)

    def _on_key_revoked(self) -> None:
        if self._leaving is None:
            logger.error("this peer's API key was revoked: it leaves the swarm")
            self._leaving = asyncio.create_task(self.stop(), name="leave-revoked-key")

    def _on_run_state(self, state: RunState) -> None:
        if state == RunState.STOPPED and self._leaving is None:
            logger.warning("the run owner stopped the run: this peer leaves the swarm")
            self._leaving = asyncio.create_task(self.stop(), name="leave-stopped-run")
        elif state == RunState.PAUSED:
            logger.warning("the run owner paused the run: serving stays up, trainers wait")

    async def _in_compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn, *args)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> "Peer":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
