"""``Peer``: a serving peer's whole life: join the DHT, measure itself, claim a span of stages, load
them, serve, move when that raises the swarm's bottleneck, leave.

    async with Peer(settings) as peer:       # joined, loaded, announced online
        await peer.wait_closed()             # until stop() (Ctrl+C / SIGTERM in the CLI)

``start`` and ``stop`` are idempotent; ``stop`` withdraws the record, removes the handlers and shuts
the DHT process and its p2pd down, so nothing is left running.

Placement (``shards.placement``): on join the peer measures its throughput for one stage of the model,
its links to up to three peers and its free memory (``peers.measure``), and claims the span of one or
more consecutive stages (at most ``peer.max_stages``, as many as its memory holds) that raises the
bottleneck most. Every ``rebalance_period`` (randomised) it asks ``should_move``; a peer with a move
waits a delay that shrinks with its gain and asks again (so the one that gains most goes first and
the others see its claim), then moves its whole span: it announces ``loading`` for the new stages,
``draining`` for the old ones (trainers stop routing to them), drains in-flight requests, loads the
new span and announces it online.

Each served stage is a ``StageSlot``: its own record (``{run}_stage_{i}``, with ``throughput`` the
peer's share per stage, ``min(compute / k, network)`` for ``k`` stages, as placement counts it), its
executor, optimizer and averager (replicas of a stage average under ``{run}_stage{i}``), its state
adopted from a live replica on join or move, and its checkpoints. The handlers are registered once and
dispatch each request to the slot of the stage it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Collection, Mapping, Sequence

import torch
from hivemind.utils import get_dht_time

from dht.bans import banned_peers
from dht.clock import check_clock
from dht.schemas import MetricsReport, RunState
from dht.records import SwarmDHT
from dht.schemas import RECORD_REFRESH, Manifest, PeerRecord, PeerState
from peers.training.averaging import HivemindGradientSync
from peers.state.checkpoint_files import CheckpointDir
from peers.state.checkpoints import Checkpointer
from peers.training.client import StageClient
from peers.training.executor import StageExecutor
from peers.telemetry.hardware import compute_threads, probe_hardware, release_free_memory
from peers.joining.measure import (
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
from peers.training.protocol import BACKWARD, FORWARD
from peers.training.push import PushService
from peers.joining.reachability import explain_placement
from peers.joining.claims import joiners_in, loads_without, replica_cost
from peers.training.routing import record_loads
from net.admission import PUBLIC_REQUEST_BYTES
from net.auth import PRESENT, AuthedTransport, RunAuth
from peers.inference.sessions import InferenceSessions
from peers.inference.service import InferenceService
from peers.state.recovery import adopt_state
from peers.state.resync import ResyncWatch
from peers.telemetry.runcontrol import RunWatcher
from peers.training.service import StageService
from peers.state.snapshot import StateIdentity, part_name
from peers.state.store_client import StoreClient
from peers.telemetry.publisher import PeerTelemetry
from net.transport import P2PTransport
from peers.training.worker import DEFAULT_QUEUE_SIZE, ComputeWorker
from shards.placement import (
    Joiner,
    Move,
    PlacedPeer,
    ReplicaCost,
    Span,
    choose_stages,
    effective_loads,
    plan_joiners,
    rebalancing_needed,
    should_move,
)
from shards.source import resolve_model
from shards.stage import load_stage
from core.types import LayerRange
from core.loop import Lifecycle, bounded, cancel_and_wait
from core.config import SwarmSettings
from core.errors import (
    CapacityExceeded,
    ConfigError,
    DelegationRefused,
    InsufficientMemory,
    ModelLoadError,
    PeerUnavailable,
    SwarmError,
    WrongStage,
)

__all__ = ["Peer", "StageSlot", "WorkHook"]

logger = logging.getLogger(__name__)

WorkHook = Callable[[str, Any, list[torch.Tensor], dict, list[torch.Tensor]], Awaitable[None]]
"""``hook(method, message, tensors, reply, out)`` after a hosted stage answered a forward or backward."""


@dataclass
class StageSlot:
    """One stage this peer serves: what it announces, and (once loaded) its service, averager and
    checkpoints. A slot without a service is loading.

    Each slot has its own compute thread: a stage's requests run one at a time on it (no locks around
    the module and optimizer), and a step that waits for its replicas to average holds up only its own
    stage. On one shared thread, two peers serving stages 2..3 that took the two step calls in
    opposite orders would each wait for the other's averaging until the timeout."""

    stage: int
    record: PeerRecord
    service: StageService | None = None
    inference: InferenceService | None = None  # generation sessions (KV caches) on this stage's layers
    sync: HivemindGradientSync | None = None
    checkpointer: Checkpointer | None = None
    checkpoint_task: asyncio.Task | None = None
    worker: ThreadPoolExecutor | None = None
    on_work: WorkHook | None = None  # a stage hosted for a delegator: told of every forward/backward done
    queue_size: int = DEFAULT_QUEUE_SIZE

    def __post_init__(self) -> None:
        if self.worker is None:
            self.worker = ComputeWorker(f"stage{self.stage}", queue_size=self.queue_size)

    async def run(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` on this stage's compute thread."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def close(self) -> None:
        """Stop its checkpoints and generation sessions, release its executor and averager (the service owns the averager once
        it exists) and its thread."""
        await cancel_and_wait(self.checkpoint_task)
        if self.inference is not None:  # open sessions end with the stage; their clients re-open elsewhere
            await self.inference.stop()
        if self.service is not None:
            self.service.shutdown()
        elif self.sync is not None:
            self.sync.shutdown()
        await asyncio.to_thread(self.worker.shutdown, wait=True, cancel_futures=True)


class Peer(Lifecycle):
    """One volunteer serving a span of one or more consecutive stages of a run."""

    def __init__(self, settings: SwarmSettings, *, manifest_timeout: float = 60.0, progress: Progress | None = None):
        self.settings = settings
        self.manifest_timeout = manifest_timeout
        self.dht: SwarmDHT | None = None
        self.manifest: Manifest | None = None
        self.slots: dict[int, StageSlot] = {}  # by stage, in order: the span served (or loading) now
        self.hosted: dict[int, StageSlot] = {}  # stages served on other machines' behalf (delegation)
        self.measurement: Measurement | None = None
        self.moves: list[Move] = []
        self._progress = progress
        self._pending: list[PeerRecord] = []  # the span being moved to, while the old one drains
        self._moving = False
        self._stage_bytes: list[int] = []
        self._memory = 0
        self._rebalancing = False
        self._unanswered: Counter[str] = Counter()  # lone replicas of other stages that did not answer a probe
        self._found_empty = False  # a stage had no peer when this one chose: peers joining with it are planned as a group
        self._in_flight_by_stage: Counter[int | None] = Counter()  # requests being served, per stage (draining)
        self._last_request_by_stage: dict[int | None, float] = {}
        self._transport: P2PTransport | None = None
        self.push: PushService | None = None  # activations peer to peer (``peers.push``)
        self._refresh_task: asyncio.Task | None = None
        self._rebalance_task: asyncio.Task | None = None
        self.telemetry: PeerTelemetry | None = None
        self.claim_reason = ""
        self._past_steps: dict[int, int] = {}
        self._watcher: RunWatcher | None = None
        self._leaving: asyncio.Task | None = None
        self._auth: RunAuth | None = None
        self.resync: ResyncWatch | None = None
        # measuring runs here; each served stage computes on a thread of its own (see StageSlot)
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")

    @property
    def peer_id(self) -> str:
        assert self.dht is not None, "the peer has not started"
        return self.dht.peer_id

    @property
    def maddrs(self) -> list[str]:
        return self.dht.visible_maddrs() if self.dht else []

    @property
    def stages(self) -> list[int]:
        """The stages this peer serves (or loads) now, in order."""
        return list(self.slots)

    @property
    def span(self) -> Span | None:
        return Span(self.stages[0], len(self.slots)) if self.slots else None

    @property
    def record(self) -> PeerRecord | None:
        """The record of the first stage served (the only one for a one-stage peer)."""
        return next(iter(self.slots.values())).record if self.slots else None

    @property
    def service(self) -> StageService | None:
        """The service of the first stage served (``slots`` has every stage's)."""
        return next(iter(self.slots.values())).service if self.slots else None

    @property
    def inference(self) -> InferenceService | None:
        """The generation service of the first stage served (``slots`` has every stage's)."""
        return next(iter(self.slots.values())).inference if self.slots else None

    def checkpointers(self) -> list[Checkpointer]:
        return [slot.checkpointer for slot in self.slots.values() if slot.checkpointer is not None]

    async def _start(self) -> None:
        net = self.settings.network
        torch.set_num_threads(compute_threads(self.settings.peer.threads))
        if not net.initial_peers:
            raise ConfigError("a peer needs --bootstrap (or network.initial_peers) to find the swarm")
        self.dht = await asyncio.to_thread(
            SwarmDHT.create, self.settings.run_id, initial_peers=net.initial_peers, host=net.host,
            port=net.port, announce_host=net.announce_host, identity_path=self._identity_path(),
        )
        self.telemetry = PeerTelemetry(self.settings, self.dht)
        self.telemetry.start_monitor()
        self.manifest = await self.dht.wait_manifest(self.manifest_timeout)
        await check_clock(self.dht)  # a clock minutes behind would make this peer silently invisible
        self._auth = await RunAuth.join(self.dht, self.settings.key, on_revoked=self._on_key_revoked)
        # on a keyed run every handler but ``present`` refuses a caller without a token before its body
        self._transport = P2PTransport(await self.dht.dht.replicate_p2p(),
                                       gate=self._auth.gate if self._auth is not None else None)
        if self._auth is not None:
            await self._transport.serve(PRESENT, self._auth.gate.rpc_present, public=True,
                                        max_request_bytes=PUBLIC_REQUEST_BYTES)
            self._auth.start()
        await serve_echo(self._transport)  # joining peers time their links against this one
        self.measurement = await self._measure(self.manifest)
        span = await self._choose_span(self.manifest)
        logger.info("claiming %s, layers %s of %s", span, self._layers_of(span), self.manifest.model)
        await self._claim_stages(span)
        if self.settings.peer.stage is None and self._found_empty:  # a new run (or a hole): others may join now too
            span = await self._settle_claim(span)
        await self._serve_span(span)
        await self._register_handlers()
        self.telemetry.start_serving(self.stages, self._step_of, self._replica_transport(),
                                     counts=lambda stage: stage not in self.hosted)
        await self._announce_online()
        self._refresh_task = asyncio.create_task(self._refresh_forever(), name="peer-record-refresh")
        self.resync = ResyncWatch(self.dht.stage_records, self._served_executors, StageClient(self._replica_transport()),
                                  self._identity, self.peer_id)
        self.resync.start()
        for stage in self.slots:  # the trainers count a newcomer in a step only once they have read its record
            self.resync.nudge(stage)
        self._watcher = RunWatcher(self.dht, self._metrics_report, on_change=self._on_run_state,
                                   on_control=self._auth.follow if self._auth is not None else None)
        self._watcher.start()
        if self._may_rebalance:
            self.start_rebalancing()
        logger.info("serving %s (layers %s) at %.0f tokens/s per stage", span, self._layers_of(span),
                    self.record.throughput)

    def _identity_path(self) -> Path | None:
        """A delegate keeps its libp2p identity across restarts (delegators were given its address);
        other peers take a new one each start."""
        if not self.settings.delegation.accept:
            return None
        folder = self.settings.state_dir.expanduser() / self.settings.run_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder / "delegate-identity.key"

    @property
    def _may_rebalance(self) -> bool:
        peer = self.settings.peer
        return peer.rebalance if peer.rebalance is not None else peer.stage is None

    def _layers_of(self, span: Span) -> str:
        stages = self.manifest.stages
        return f"[{stages[span.start].start}, {stages[span.end].end})"

    def _span_records(self, span: Span, state: PeerState) -> list[PeerRecord]:
        """One record per stage of ``span``, each with this peer's share of its throughput."""
        m = self.measurement
        return [PeerRecord(
            peer_id=self.peer_id, maddrs=self.maddrs, stage=stage, layers=self.manifest.stages[stage], state=state,
            hardware=probe_hardware(), throughput=m.per_stage(span.count), latency_ms=m.latency_ms,
            bandwidth_mbps=m.bandwidth_mbps, memory_gib=m.memory_gib, compute=m.compute or m.throughput,
            network=m.network if m.network is not None and m.network != float("inf") else None,
            access_token=self._auth.token if self._auth is not None else None,  # keyed runs refuse records without
        ) for stage in span.stages]

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
        if peer.throughput is not None:  # the owner knows better (or a test needs equal peers)
            compute = peer.throughput
        else:
            compute = await self._in_compute(
                cached_stage_throughput, self.settings.state_dir.expanduser(), key,
                lambda: measure_stage(config, largest, dtype=dtype, device=device, delay=peer.slowdown))
        self._report("compute", 1.0)
        records = await self.dht.all_records(manifest.num_stages)
        others = sorted({r.peer_id for rs in records.values() for r in rs
                         if r.state == PeerState.ONLINE and r.peer_id != self.peer_id})
        random.shuffle(others)
        latency, bandwidth = await measure_links(self._replica_transport(), others[:3], progress=self._progress)
        self._report("network", 1.0)
        network = network_tokens_per_second(bandwidth, config.hidden_size, dtype)
        measurement = Measurement(throughput=round(min(compute, network), 1), latency_ms=latency,
                                  bandwidth_mbps=bandwidth, memory_gib=round(self._memory / 2**30, 2),
                                  compute=compute, network=network)
        logger.info("measured %.0f tokens/s for one stage on %s (compute %.0f), latency %s ms, bandwidth %s "
                    "Mbit/s, %.1f GiB for stages", measurement.throughput, device, compute, latency, bandwidth,
                    measurement.memory_gib)
        return measurement

    def _report(self, what: str, done: float) -> None:
        if self._progress is not None:
            self._progress(what, done)

    async def _choose_span(self, manifest: Manifest) -> Span:
        pinned = self.settings.peer.stage
        if pinned is not None:
            span = Span.parse(pinned)
            if span.end >= manifest.num_stages:
                raise ConfigError(f"--stage {pinned}: stage {span.end} does not exist, the run has "
                                  f"{manifest.num_stages} stages (0 to {manifest.num_stages - 1})")
            needed = sum(self._stage_bytes[stage] for stage in span.stages)
            if needed > self._memory:
                raise InsufficientMemory(f"--stage {pinned} needs {needed / 2**30:.2f} GiB (parameters, gradients "
                                         f"and AdamW state) but this peer has {self._memory / 2**30:.2f} GiB free")
            self.claim_reason = "pinned with --stage"
            return span
        records = await self.dht.all_records(manifest.num_stages)
        loads, replicas = loads_without(manifest.num_stages, records, {self.peer_id})
        served = {r.stage for rs in records.values() for r in rs if r.state == PeerState.ONLINE}
        self._found_empty = len(served) < manifest.num_stages  # claims (``loading``) are no service yet
        m = self.measurement
        span = choose_stages(loads, self._stage_bytes, compute=m.compute, network=m.network,
                             memory_bytes=self._memory, max_stages=self.settings.peer.max_stages, rng=random.Random(),
                             replicas=replicas, cost=self._cost)
        self.claim_reason = explain_placement(loads, span.start, m.per_stage(span.count), count=span.count)
        return span

    @property
    def _cost(self) -> ReplicaCost:
        return replica_cost(self.manifest, self._stage_bytes, self.settings.peer, self.measurement.bandwidth_mbps)

    async def _claim_stages(self, span: Span) -> None:
        """Announce ``loading`` for every stage of ``span`` (a slot each, nothing loaded yet) and
        withdraw the claim on stages of an earlier claim that ``span`` leaves out."""
        for stage in [stage for stage in self.slots if stage not in span.stages]:
            await self.dht.withdraw(self.slots.pop(stage).record)
        claimed = get_dht_time()
        for record in self._span_records(span, PeerState.LOADING):
            record = record.model_copy(update={"claimed": claimed})
            self.slots[record.stage] = StageSlot(record.stage, record, queue_size=self.settings.peer.queue_size)
            await self._announce(record)
        self.slots = dict(sorted(self.slots.items()))

    async def _settle_claim(self, span: Span, rounds: int = 3) -> Span:
        """Claim, then verify (when this peer found a stage nobody serves: a new run, or a hole that
        several peers may rush to): wait ``peer.claim_settle`` s for the claims of peers joining at the same
        moment, then take this peer's span in ``plan_joiners`` of that group (every member computes the
        same plan from the same records, so they split the stages instead of each claiming the whole
        model). A changed claim is announced and verified again (bounded)."""
        settle = self.settings.peer.claim_settle
        for _ in range(rounds if settle > 0 else 0):
            await asyncio.sleep(settle)
            records = await self.dht.all_records(self.manifest.num_stages)
            m = self.measurement
            me = Joiner(self.peer_id, m.compute or m.throughput, self._memory, m.network or float("inf"))
            group = joiners_in(records, me, now=get_dht_time(), settled_after=2 * settle)
            if len(group) < 2:
                return span
            loads, replicas = loads_without(self.manifest.num_stages, records, {j.peer_id for j in group})
            planned = plan_joiners(loads, replicas, group, self._stage_bytes, cost=self._cost,
                                   max_stages=self.settings.peer.max_stages).get(self.peer_id, span)
            if planned == span:
                logger.info("%d peers are joining together; this one keeps %s", len(group), span)
                return span
            logger.info("%d peers are joining together: this one takes %s instead of %s", len(group), planned, span)
            self.claim_reason = f"split with {len(group) - 1} peer(s) joining at the same time"
            await self._claim_stages(planned)
            span = planned
        return span

    # -- serving ----------------------------------------------------------------------------------

    async def _serve_span(self, span: Span, stages: Collection[int] | None = None) -> None:
        """Load every stage of ``span`` (or only ``stages`` of it: a move keeps the others as they are;
        each slot exists, announced ``loading``) with its averager, then adopt each stage's current
        state. Every averager forks a process: all of them start before any state download opens a
        stream (the child closes its copies of open streams, see ``peers.averaging``, but a span's
        own downloads need not test that). Free heap goes back to the system before the forks and at
        the end (see ``release_free_memory``)."""
        stages = list(span.stages) if stages is None else sorted(stages)
        release_free_memory()
        for stage in stages:
            await self._load_slot(self.slots[stage])
        for stage in stages:
            slot = self.slots[stage]
            await self._adopt_state(slot, self._identity)  # never serve stale weights
            self._start_checkpoints(slot)
            slot.inference = self._serve_inference(slot)
        release_free_memory()

    async def _load_slot(self, slot: StageSlot) -> None:
        """The slot's module, averager (prefix ``{run}_stage{i}``: every replica of the stage), executor
        and service."""
        stage = slot.stage
        module = await slot.run(self._load, self.manifest, stage)
        prefix = f"{self.manifest.run_id}_stage{stage}".replace(".", "_")  # hivemind: no dots in a prefix
        slot.sync = await asyncio.to_thread(HivemindGradientSync, self.dht.dht, prefix, list(module.parameters()),
                                            round_timeout=self.settings.peer.averaging_timeout,
                                            clip=self.settings.peer.averaging_clip)
        executor = StageExecutor(
            module, stage, self.manifest.stages[stage], self.manifest.optimizer,
            cache_size=self.settings.peer.cache_size, sync=slot.sync,
            averaging_timeout=self.settings.peer.averaging_timeout, max_abs=self.settings.peer.max_abs_value,
        )
        executor.corrupt = self.settings.peer.corrupt
        slot.service = StageService(executor, self.peer_id, worker=slot.worker, identity=self._identity)
        slot.service.on_step_failed = self._on_step_failed

    # -- hosting stages for delegators (delegation/ drives these) ----------------------------------

    async def stage_to_host(self, wanted: int | None, *, taken: Collection[int] = ()) -> int:
        """The stage a new delegation session would serve: ``wanted``, else the stage with the least
        live throughput that this peer neither serves nor hosts (nor has promised: ``taken``).
        ``DelegationRefused`` names why a stage cannot be hosted here, ``CapacityExceeded`` when memory
        is short."""
        busy = set(self.slots) | set(self.hosted) | {r.stage for r in self._pending} | set(taken)
        num_stages = self.manifest.num_stages
        if wanted is None:
            records = await self.dht.all_records(num_stages)
            loads = record_loads(num_stages, records)
            free = [stage for stage in range(num_stages) if stage not in busy]
            if not free:
                raise DelegationRefused(f"peer {self.peer_id[-8:]} already serves or hosts every stage of the run")
            wanted = min(free, key=lambda stage: (loads[stage], stage))
        if wanted >= num_stages:
            raise DelegationRefused(f"stage {wanted} does not exist: the run has {num_stages} stages "
                                    f"(0 to {num_stages - 1})")
        if wanted in busy:
            raise DelegationRefused(f"peer {self.peer_id[-8:]} already serves or hosts stage {wanted}")
        used = sum(self._stage_bytes[stage] for stage in set(self.slots) | set(self.hosted))
        if used + self._stage_bytes[wanted] > self._memory:
            raise CapacityExceeded(f"stage {wanted} needs {self._stage_bytes[wanted] / 2**30:.2f} GiB; peer "
                                   f"{self.peer_id[-8:]} has {(self._memory - used) / 2**30:.2f} GiB left")
        return wanted

    async def host_stage(self, stage: int, *, on_behalf_of: str, on_work: WorkHook) -> None:
        """Load ``stage`` (its state from a live replica, else a checkpoint) and serve it for the peer
        ``on_behalf_of``: trainers reach it through that peer's record (``hosted_record``), which this
        peer does not announce itself, and its work goes to ``on_work``, not to this peer's ledger."""
        await self.stage_to_host(stage)
        slot = StageSlot(stage, self._hosted_record(stage, on_behalf_of, PeerState.LOADING), on_work=on_work,
                         queue_size=self.settings.peer.queue_size)
        self.hosted[stage] = slot
        try:
            await self._load_slot(slot)
            await self._adopt_state(slot, self._identity)
        except BaseException:
            self.hosted.pop(stage, None)
            await slot.close()
            raise
        self._start_checkpoints(slot)
        slot.record = slot.record.model_copy(update={"state": PeerState.ONLINE})
        logger.info("hosting stage %d for %s", stage, on_behalf_of[-8:])

    async def release_stage(self, stage: int) -> None:
        """Stop serving a hosted stage (its session ended). Idempotent."""
        slot = self.hosted.pop(stage, None)
        if slot is not None:
            await slot.close()
            logger.info("released stage %d hosted for %s", stage, (slot.record.delegate_of or "?")[-8:])

    def hosted_record(self, stage: int) -> PeerRecord | None:
        """The record a hosted stage's delegator announces: this peer's address, current step, load and
        hardware (without a token: the delegator adds its own, as the signer)."""
        slot = self.hosted.get(stage)
        if slot is None:
            return None
        return self.telemetry.refresh(self._current_record(slot))

    def _hosted_record(self, stage: int, delegator: str, state: PeerState) -> PeerRecord:
        m = self.measurement
        return PeerRecord(
            peer_id=self.peer_id, maddrs=self.maddrs, stage=stage, layers=self.manifest.stages[stage], state=state,
            hardware=probe_hardware(), throughput=m.per_stage(len(self.slots) + len(self.hosted) + 1),
            latency_ms=m.latency_ms, bandwidth_mbps=m.bandwidth_mbps, memory_gib=m.memory_gib, delegate_of=delegator,
        )

    def stage_layers(self, stage: int) -> LayerRange:
        return self.manifest.stages[stage]

    def gpu_count(self) -> int:
        """GPUs of this machine (NVML's count, else torch's)."""
        counted = self.telemetry.hardware().gpu_count if self.telemetry is not None else 0
        return max(counted, torch.cuda.device_count())

    async def serve_control(self, method: str, handler: Callable) -> None:
        """Register a handler beside the stage RPCs, behind the run's auth gate on keyed runs (the
        delegation RPCs); it is not counted as served work."""
        await self._transport.serve(method, handler)

    def _serve_inference(self, slot: StageSlot) -> InferenceService:
        """Generation sessions (KV caches) on a served stage's module, on its compute thread; they end
        with the stage."""
        peer, executor = self.settings.peer, slot.service.executor
        sessions = InferenceSessions(executor.module, executor.stage, executor.layers,
                                     memory_budget=int(peer.inference_memory), idle_timeout=peer.session_timeout)
        inference = InferenceService(sessions, slot.worker)
        inference.start()
        return inference

    async def _register_handlers(self) -> None:
        """Once: the handlers dispatch to whichever stage this peer serves now. A keyed run lets only
        callers that presented a token through (the transport's gate, before a request is read), so
        telemetry counts only what passed it (a refused call is no work)."""
        transport = self.telemetry.observe(self._transport)
        for method in self.service.handlers():  # the same methods for every stage
            await transport.serve(method, self._dispatch(method, self._service_for))
        # activations peer to peer: a pushed hop goes through the same (counted) forward or backward
        hop = {method: transport.wrap(method, self._dispatch(method, self._service_for)) for method in (FORWARD, BACKWARD)}
        self.push = PushService(self.peer_id, lambda method, message, tensors: hop[method](message, tensors),
                                self._replica_transport())
        await self.push.register(self._transport)  # not counted itself: its hop is
        for method in self.slots[self.stages[0]].inference.handlers():
            await transport.serve(method, self._dispatch(method, self._inference_for))

    def _step_of(self, stage: int) -> int:
        """The optimizer step of ``stage``: a served stage's now, a stage left by a move its last one."""
        slot = self.slots.get(stage)
        if slot is not None and slot.service is not None:
            return slot.service.executor.optimizer_step
        return self._past_steps.get(stage, 0)

    def _service_for(self, message: Any) -> StageService:
        """The service of the stage a request names. A message without a stage (``info``, or a
        malformed one) goes to the first stage's service, whose parser answers it or names the error."""
        stage = message.get("stage") if isinstance(message, dict) else None
        named = isinstance(stage, int) and not isinstance(stage, bool)
        hosted = self.hosted.get(stage) if named else None
        if hosted is not None and hosted.service is not None:
            return hosted.service
        slot = self.slots.get(stage) if named else next(iter(self.slots.values()), None)
        if slot is not None and slot.service is not None:
            return slot.service
        first = next(iter(self.slots.values()), None)
        if self._moving or first is None or first.service is None or slot is not None:
            raise PeerUnavailable(f"peer {self.peer_id[-8:]} is loading {self.span or 'its stages'}")
        first.service.errors_replied += 1  # the peer's refusals count with its first stage's (``info``)
        logger.info("refused a request for stage %s: this peer serves %s", stage, self.span)
        raise WrongStage(f"peer {self.peer_id[-8:]} serves {self.span}, not stage {stage}")

    def _inference_for(self, message: Any) -> InferenceService:
        """The generation service of the stage an ``open`` names, or of the stage holding the session a
        ``step`` / ``close`` names; anything else goes to the first stage's, which answers or names the
        error (an unknown session: ``CacheMiss``)."""
        stage = message.get("stage") if isinstance(message, dict) else None
        session = message.get("session_id") if isinstance(message, dict) else None
        slots = [s for s in self.slots.values() if s.inference is not None]
        if not slots or self._moving:
            raise PeerUnavailable(f"peer {self.peer_id[-8:]} is loading {self.span or 'its stages'}")
        if isinstance(stage, int) and not isinstance(stage, bool):
            slot = self.slots.get(stage)
            if slot is None or slot.inference is None:
                raise WrongStage(f"peer {self.peer_id[-8:]} serves {self.span}, not stage {stage}")
            return slot.inference
        if not isinstance(session, str):  # malformed: the first stage's parser names the error
            return slots[0].inference
        return next((s.inference for s in slots if session in s.inference.sessions), slots[0].inference)

    def _dispatch(self, method: str, service_for: Callable[[Any], StageService | InferenceService]) -> Callable:
        """A handler that forwards to the service ``service_for(message)`` picks for the request (a
        move swaps them), counts requests in flight for draining, and adds the configured artificial
        slowdown."""
        slowdown = self.settings.peer.slowdown if method in (FORWARD, BACKWARD) else 0.0

        async def handler(message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
            service = service_for(message)
            stage = getattr(getattr(service, "executor", None), "stage", None)
            self._in_flight_by_stage[stage] += 1
            self._last_request_by_stage[stage] = time.monotonic()
            try:
                if slowdown:
                    await asyncio.sleep(slowdown)
                reply, out = await service.handlers()[method](message, tensors)
            finally:
                self._in_flight_by_stage[stage] -= 1
                self._last_request_by_stage[stage] = time.monotonic()
            await self._report_hosted_work(service, method, message, tensors, reply, out)
            return reply, out

        return handler

    async def _report_hosted_work(self, service: Any, method: str, message: Any, tensors: list[torch.Tensor],
                                  reply: dict, out: list[torch.Tensor]) -> None:
        """A hosted stage's answered forward/backward goes to its session's hook (its receipts)."""
        if method not in (FORWARD, BACKWARD) or not isinstance(reply, dict) or "ok" not in reply:
            return
        slot = next((s for s in self.hosted.values() if s.service is service), None)
        if slot is not None and slot.on_work is not None:
            try:
                await slot.on_work(method, message, tensors, reply, out)
            except Exception:  # a receipt lost costs the delegator credit, never the trainer its reply
                logger.exception("recording work on hosted stage %d failed", slot.stage)

    # -- rebalancing ------------------------------------------------------------------------------

    def start_rebalancing(self) -> None:
        """Re-evaluate this peer's stage every ``rebalance_period`` (started on join unless the stage is
        pinned; a pinned peer may be let loose later). Idempotent."""
        if self._rebalance_task is None:
            self._rebalance_task = asyncio.create_task(self._rebalance_forever(), name="peer-rebalance")

    async def _rebalance_forever(self) -> None:
        """Every ``watch_period`` s a quick look: a move that fills an empty stage or drops part of this
        peer's own span (nothing to load) is made at once; any other move is considered once per
        ``rebalance_period`` (randomised), the peer that gains most going first."""
        peer, rng = self.settings.peer, random.Random()
        next_full = time.monotonic() + peer.rebalance_period * rng.uniform(0.5, 1.5)
        while True:
            await asyncio.sleep(peer.watch_period * rng.uniform(0.8, 1.2))
            try:
                move = await self.consider_move()
                if move is None:
                    continue
                if _urgent(move):  # others may have seen the same: a random pause, then the claim decides
                    await asyncio.sleep(peer.watch_period * rng.random())
                elif time.monotonic() < next_full:
                    continue
                else:
                    next_full = time.monotonic() + peer.rebalance_period * rng.uniform(0.5, 1.5)
                    await asyncio.sleep(peer.rebalance_period * 0.5 * rng.random() / (1 + min(move.gain, 3.0)))
                move = await self.consider_move()
                if move is not None and await self._claim(move, settle=min(2.0, peer.rebalance_period / 4)):
                    await self.move_to(move)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a failed check or move must not stop serving; the next look retries
                logger.warning("rebalancing failed: %s: %s", type(e).__name__, e)

    async def _claim(self, move: Move, *, settle: float) -> bool:
        """Announce the move (``loading`` on the stages it adds, ``draining`` on the ones it drops), give
        other claims ``settle`` seconds to show, and keep the claim only if the move still holds with
        every other claim counted. Two peers that claimed the same hole, or that both drop the same
        stage, at the same moment both back off (and draw new random times): a claim that survives
        this check is the only one."""
        added = [s for s in move.new.stages if s not in self.slots]
        self._pending = [r for r in self._span_records(move.new, PeerState.LOADING) if r.stage in added]
        for record in self._pending:
            await self.dht.announce(record)
        for slot in self.slots.values():
            if slot.stage not in move.new.stages:
                await self._announce(self._current_record(slot).model_copy(update={"state": PeerState.DRAINING}))
        await asyncio.sleep(settle)
        again = await self.consider_move()
        if again is not None and again.new == move.new:
            return True
        logger.info("another peer claimed the same change first; staying on %s", self.span)
        pending, self._pending = self._pending, []
        for record in pending:
            await self.dht.withdraw(record)
        await self._announce_online()
        return False

    async def consider_move(self) -> Move | None:
        """``should_move`` on the current DHT records (with each stage's replicas and what they cost in
        averaging), this peer counted as it serves now."""
        manifest, span, m = self.manifest, self.span, self.measurement
        records = await self.dht.all_records(manifest.num_stages)
        await self._probe_lone_replicas(records)
        gone = {peer for peer, missed in self._unanswered.items() if missed >= 2}
        loads, replicas = loads_without(manifest.num_stages, records, {self.peer_id} | gone)
        for stage, slot in [*self.slots.items(), *self.hosted.items()]:
            loads[stage] += slot.record.throughput
            replicas[stage] += 1
        peer, cost = self.settings.peer, self._cost
        self._rebalancing = rebalancing_needed(effective_loads(loads, replicas, cost), peer.rebalance_margin,
                                               self._rebalancing)
        me = PlacedPeer(self.peer_id, m.compute, span, m.network)
        move = should_move(loads, self._stage_bytes, me, memory_bytes=self._memory, margin=peer.rebalance_margin,
                           active=self._rebalancing, max_stages=peer.max_stages, replicas=replicas, cost=cost)
        if move is not None and set(move.new.stages) & set(self.hosted):
            return None  # one slot per stage on a peer: a stage hosted for a delegator stays with it
        return move

    async def _probe_lone_replicas(self, records: Mapping[int, Sequence[PeerRecord]]) -> None:
        """Ask the only other replica of each stage this peer does not serve whether it is there
        (``info``, 2 s). A peer killed outright leaves its records in the DHT until they expire (up to
        ``RECORD_TTL``); one that did not answer twice in a row counts as gone, so its stage shows as
        empty and is refilled now rather than a minute later."""
        client = StageClient(self._replica_transport(), attempts=1)
        for stage, stage_records in records.items():
            online = {r.peer_id for r in stage_records if r.state == PeerState.ONLINE and r.peer_id != self.peer_id}
            if stage in self.slots or len(online) != 1:
                continue
            (peer,) = online
            try:
                await asyncio.wait_for(client.info(peer, stage), 2.0)
                self._unanswered.pop(peer, None)
            except (SwarmError, asyncio.TimeoutError) as e:
                self._unanswered[peer] += 1
                logger.info("stage %d's only replica %s did not answer (%d time(s)): %s", stage, peer[-8:],
                            self._unanswered[peer], e)

    async def move_to(self, move: Move) -> None:
        """Leave the old span for ``move.new``. Stages in both spans stay as they are: their module,
        optimizer state and step are kept in memory and serve on. Stages only in the new span are
        claimed (``loading``) and loaded, each from a live replica. Stages only in the old span are
        announced ``draining``, served until trainers have moved on, then withdrawn; a stage no other
        online replica serves is never dropped (the move is called off instead)."""
        old = self.span
        added = [s for s in move.new.stages if s not in self.slots]
        dropped = [s for s in self.slots if s not in move.new.stages]
        logger.info("moving from %s to %s: bottleneck %.0f -> %.0f tokens/s (keeping %s)", old, move.new,
                    move.bottleneck_before, move.bottleneck_after,
                    ", ".join(str(s) for s in self.slots if s in move.new.stages) or "nothing")
        if sorted(r.stage for r in self._pending) != added:
            self._pending = [r for r in self._span_records(move.new, PeerState.LOADING) if r.stage in added]
            for record in self._pending:
                await self.dht.announce(record)
        for stage in dropped:
            slot = self.slots[stage]
            await self._announce(self._current_record(slot).model_copy(update={"state": PeerState.DRAINING}))
        await self._drain(dropped)
        alone = [stage for stage in dropped if not await self._online_replicas(stage, reads=2)]
        if alone:
            logger.warning("not moving to %s: no other online peer serves stage(s) %s", move.new,
                           ", ".join(map(str, alone)))
            for record in self._pending:
                await self.dht.withdraw(record)
            self._pending = []
            await self._announce_online()
            return
        self._moving = True
        try:
            for stage in dropped:
                slot = self.slots.pop(stage)
                self._past_steps[stage] = slot.service.executor.optimizer_step  # its last ledger window still ends
                await self.dht.withdraw(slot.record)
                await slot.close()
            shares = self._span_records(move.new, PeerState.ONLINE)
            for record in shares:  # a kept stage's share of this peer changes with the span's length
                if record.stage in self.slots:
                    slot = self.slots[record.stage]
                    slot.record = slot.record.model_copy(update={"throughput": record.throughput})
            for record in self._pending:
                self.slots[record.stage] = StageSlot(record.stage, record, queue_size=self.settings.peer.queue_size)
            self.slots = dict(sorted(self.slots.items()))
            self._pending = []
            await self._serve_span(move.new, added)
        finally:
            self._moving = False
        self.telemetry.follow_stages(self.stages)
        if self.resync is not None:
            for stage in added:
                self.resync.nudge(stage)
        self.claim_reason = (f"moved from {old}: bottleneck {move.bottleneck_before:.0f} -> "
                             f"{move.bottleneck_after:.0f} tokens/s")
        await self._announce_online()
        self.moves.append(move)
        logger.info("now serving %s (layers %s)", move.new, self._layers_of(move.new))

    async def _drain(self, stages: Collection[int]) -> None:
        """Serve the ``stages`` being left for ``drain_seconds`` (trainers refresh their routes and stop
        sending), then until none of their requests is in flight and a second passed without one; at
        most 30 s more. Nothing to wait for when no stage is left."""
        if not stages:
            return
        await asyncio.sleep(self.settings.peer.drain_seconds)
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            busy = sum(self._in_flight_by_stage[s] for s in stages)
            idle = min(time.monotonic() - self._last_request_by_stage.get(s, 0.0) for s in stages)
            if busy == 0 and idle >= 1.0:
                return
            await asyncio.sleep(0.1)
        logger.warning("stage(s) %s still had requests in flight after draining; leaving anyway",
                       ", ".join(map(str, stages)))

    def _load(self, manifest: Manifest, stage: int) -> torch.nn.Module:
        torch.set_num_threads(compute_threads(self.settings.peer.threads))
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
        return StoreClient(self._replica_transport(), self.dht.stores)

    async def _online_replicas(self, stage: int, reads: int = 4) -> list[str]:
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

    async def _adopt_state(self, slot: StageSlot, identity: StateIdentity) -> None:
        """Before serving: the current state from a live replica, else the newest checkpoint (see peers.recovery)."""
        executor = slot.service.executor
        banned = await banned_peers(self.dht)  # a replica caught returning wrong results is no source
        gone = {peer for peer, missed in self._unanswered.items() if missed >= 2}  # killed: records outlive them
        replicas = [p for p in await self._online_replicas(executor.stage) if p not in banned and p not in gone]
        source = await adopt_state(
            executor, identity, replicas=replicas, client=StageClient(self._replica_transport()),
            store=self._store_client(), local=self._checkpoint_dir(executor.stage), compute=slot.run,
        )
        logger.info("stage %d starts at optimizer step %d (state from %s)", executor.stage,
                    executor.optimizer_step, source)

    def _served_executors(self) -> list[tuple[StageExecutor, Callable]]:
        """The stages this peer serves now (hosted ones included), each with its compute thread (none
        of its own span while it moves)."""
        slots = [*self.slots.values(), *self.hosted.values()]
        return [(slot.service.executor, slot.run) for slot in slots if slot.service is not None]

    def _replica_transport(self) -> AuthedTransport | P2PTransport:
        """For calls to other peers' gated handlers (a replica's state): on a keyed run they present
        this peer's token first, as a trainer does, else the replica refuses them."""
        return self._transport if self._auth is None else AuthedTransport(self._transport, self._auth.token_text)

    @property
    def _identity(self) -> StateIdentity:
        return StateIdentity(run_id=self.settings.run_id, config_hash=self.manifest.config_hash)

    def _start_checkpoints(self, slot: StageSlot) -> None:
        """Checkpoint a served stage (a move cancels the task with the slot)."""
        executor = slot.service.executor
        slot.checkpointer = Checkpointer(
            executor, self._identity, local=self._checkpoint_dir(executor.stage), store=self._store_client(),
            every=self.settings.peer.checkpoint_every, compute=slot.run,
        )
        slot.checkpoint_task = asyncio.create_task(slot.checkpointer.run(), name=f"stage{slot.stage}-checkpoints")

    def _current_record(self, slot: StageSlot) -> PeerRecord:
        """The slot's record with the stage's current optimizer step, so trainers can tell which step it is at."""
        if slot.service is not None and slot.record.step != slot.service.executor.optimizer_step:
            slot.record = slot.record.model_copy(update={"step": slot.service.executor.optimizer_step})
        return slot.record

    async def _announce(self, record: PeerRecord) -> None:
        """Publish ``record`` (current hardware, load and token added) and keep it as its slot's record;
        a stage this peer no longer serves (a move took it away meanwhile) is not announced."""
        if self.telemetry is not None:
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

    async def _announce_online(self) -> None:
        for slot in list(self.slots.values()):
            await self._announce(self._current_record(slot).model_copy(update={"state": PeerState.ONLINE}))

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(RECORD_REFRESH)
            try:
                for slot in list(self.slots.values()):
                    await self._announce(self._current_record(slot))
                for record in list(self._pending):
                    await self.dht.announce(record)
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
        slots = [*self.slots.values(), *self.hosted.values()]
        for task in [self._refresh_task, self._rebalance_task] + [slot.checkpoint_task for slot in slots]:
            await cancel_and_wait(task)
        if final_checkpoint and self.checkpointers():
            await asyncio.gather(*(checkpointer.final(timeout=60.0) for checkpointer in self.checkpointers()))
        if self.telemetry is not None:  # first: its last ledger window still goes out over the transport
            await self.telemetry.stop()
        for record in [slot.record for slot in self.slots.values()] + self._pending:
            if self.dht is not None:
                with contextlib.suppress(Exception):  # leaving early is fine: the record expires anyway
                    await asyncio.wait_for(self.dht.withdraw(record), 5)
        if self._transport is not None:
            await self._transport.close()
        for slot in [*self.slots.values(), *self.hosted.values()]:
            await slot.close()
        self.hosted.clear()
        await asyncio.to_thread(self._compute.shutdown, wait=True, cancel_futures=True)
        if self.dht is not None:
            await bounded(asyncio.to_thread(self.dht.shutdown), 10, "the DHT process")
        self._mark_closed()
        logger.info("peer stopped")

    def _metrics_report(self) -> MetricsReport | None:
        """This peer's running total of samples (backwards) for the bootstrap's contribution tally: the
        first stage's (every stage of a span computes the same samples)."""
        if self.service is None or self.record is None:
            return None
        executor = self.service.executor
        samples = executor.optimizer_step * self.manifest.target_batch_size + executor.accumulated_samples
        return MetricsReport(peer_id=self.peer_id, role="peer", step=executor.optimizer_step,
                             samples=samples, stage=self.record.stage,
                             access_token=self._auth.token if self._auth is not None else None)

    def _on_step_failed(self, stage: int) -> None:
        if self.resync is not None:
            self.resync.nudge(stage)

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


def _urgent(move: Move) -> bool:
    """A move made at once, not once per rebalancing period: it fills a stage nobody serves, or it only
    drops stages of the peer's own span (nothing to load, the rest kept)."""
    shrink = move.old.start <= move.new.start and move.new.end <= move.old.end
    return move.bottleneck_before <= 0 or shrink
