"""``Peer``: a serving peer's whole life: join the DHT, measure itself, claim a span of stages, load
them, serve, move when that raises the swarm's bottleneck, leave.

    async with Peer(settings) as peer:       # joined, loaded, announced online
        await peer.wait_closed()             # until stop() (Ctrl+C / SIGTERM in the CLI)

``start`` and ``stop`` are idempotent; ``stop`` withdraws the records, removes the handlers and shuts
the DHT process and its p2pd down, so nothing is left running.

The peer owns its lifecycle and composes its parts: a ``StageHost`` (``peers.hosting``: the slots of
the stages it serves, their records, loading and dropping them; ``peers.delegate_host`` hosts stages
for delegators in it), a
``StageRouter`` (``peers.dispatch``: the RPC handlers, registered once, each request parsed and handed
to the slot of the stage it names) and a ``Rebalancer`` (``peers.rebalancing``: the span chosen on
join, claims settled, moves while serving). Its background loops are tasks of one ``TaskSet``.

Placement (``shards.placement``): on join the peer measures its throughput for one stage of the model,
its links to up to three peers and its free memory (``peers.joining.measure``), then the rebalancer claims the
span that raises the bottleneck most.
"""

from __future__ import annotations

import asyncio
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from dht.clock import check_clock
from dht.schemas import MetricsReport, RunState
from dht.records import SwarmDHT
from dht.schemas import RECORD_REFRESH, Manifest, PeerRecord, PeerState
from net.admission import PUBLIC_REQUEST_BYTES
from net.auth import PRESENT, AuthedTransport, RunAuth
from peers.state.checkpoints import Checkpointer
from peers.training.client import StageClient
from peers.delegate_host import DelegateHost
from peers.dispatch import StageRouter
from peers.telemetry.hardware import compute_threads
from peers.hosting import StageHost, span_layers
from peers.inference.service import InferenceService
from peers.joining.measure import (
    Measurement,
    Progress,
    available_memory,
    cached_stage_throughput,
    measure_links,
    measure_stage,
    network_tokens_per_second,
    queue_tokens,
    serve_echo,
    stage_bytes,
)
from peers.joining.claims import TOKENS_PER_SAMPLE
from peers.training.offload import offload_wanted
from shards.devices import compute_dtype, resolve_device
from peers.training.push import PushService
from peers.rebalancing import Rebalancer
from peers.state.resync import ResyncWatch
from peers.telemetry.runcontrol import RunWatcher
from peers.training.service import StageService
from peers.slot import SLOT_STOP, StageSlot
from peers.telemetry.publisher import PeerTelemetry
from net.channel import ChannelServer, Identity, channel_hosts
from net.relay import RelaySlot, Reservation, is_relayed
from net.transport import P2PTransport
from peers.joining.reachability import behind_nat, best_address
from shards.placement import Move, Span
from shards.source import resolve_model
from core.loop import Lifecycle, TaskSet, bounded, off_loop, stacks_if_slow
from core.config import SwarmSettings, offers_relay, relay_limits
from core.errors import ConfigError
from core.types import StageIndex

__all__ = ["Peer"]

logger = logging.getLogger(__name__)

RELAY_WAIT = 60.0
"""How long a peer behind NAT waits at join for a relay slot before it serves without one (and goes
on asking): a relay serves with its own limits only once AutoNAT has found it public, seconds
after it started (``net.relay``)."""
STOP_REPORT = 30.0  # s after which a stop still running logs where every thread is


class Peer(Lifecycle):
    """One volunteer serving a span of one or more consecutive stages of a run."""

    def __init__(self, settings: SwarmSettings, *, manifest_timeout: float = 60.0, progress: Progress | None = None):
        self.settings = settings
        self.device = resolve_device(settings.peer.device)  # a bad name or a GPU not here fails before joining
        self.offload_optimizer = False  # decided once measured (``_memory_plan``)
        self.manifest_timeout = manifest_timeout
        self.dht: SwarmDHT | None = None
        self.manifest: Manifest | None = None
        self.measurement: Measurement | None = None
        self.host: StageHost | None = None  # made once measured, as the parts below
        self.delegate: DelegateHost | None = None  # what ``delegation.service.serve_delegations`` drives
        self.rebalancer: Rebalancer | None = None
        self.router: StageRouter | None = None
        self.push: PushService | None = None  # activations peer to peer (``peers.training.push``)
        self.telemetry: PeerTelemetry | None = None
        self.resync: ResyncWatch | None = None
        self.relay_slot: RelaySlot | None = None  # behind NAT: the relay that lets callers reach this peer
        self._progress = progress
        self._stage_bytes: list[int] = []
        self._memory = 0
        self._transport: P2PTransport | None = None
        self._auth: RunAuth | None = None
        self._watcher: RunWatcher | None = None
        self._tasks = TaskSet()  # the record refresh and the rebalancing loop
        self._stopping: asyncio.Future | None = None
        self.failure: str | None = None  # why it left on its own, if it cannot come back by restarting as is
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
    def slots(self) -> dict[int, StageSlot]:
        """The span served (or loading) now, by stage, in order."""
        return self.host.slots if self.host is not None else {}

    @property
    def hosted(self) -> dict[int, StageSlot]:
        """Stages served on other machines' behalf (delegation)."""
        return self.host.hosted if self.host is not None else {}

    @property
    def stages(self) -> list[int]:
        """The stages this peer serves (or loads) now, in order."""
        return list(self.slots)

    @property
    def span(self) -> Span | None:
        return self.host.span if self.host is not None else None

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

    @property
    def claim_reason(self) -> str:
        """Why this peer serves its span (placement's reason, a split, a move or ``--stage``)."""
        return self.rebalancer.claim_reason if self.rebalancer is not None else ""

    @property
    def moves(self) -> list[Move]:
        return self.rebalancer.moves if self.rebalancer is not None else []

    def checkpointers(self) -> list[Checkpointer]:
        return self.host.checkpointers() if self.host is not None else []

    async def _start(self) -> None:
        net = self.settings.network
        torch.set_num_threads(compute_threads(self.settings.peer.threads))
        if self.device.type == "cuda":  # this thread's and the compute threads' default GPU: RNG forks, allocator
            torch.cuda.set_device(self.device)
        if not net.initial_peers:
            raise ConfigError("a peer needs --bootstrap (or network.initial_peers) to find the swarm")
        self.dht = await asyncio.to_thread(
            SwarmDHT.create, self.settings.run_id, initial_peers=net.initial_peers, host=net.host,
            port=net.port, announce_host=net.announce_host, identity_path=self._identity_path(),
            relay=offers_relay(net), relay_limits=relay_limits(net), in_process=not net.dht_process,
        )
        self.telemetry = PeerTelemetry(self.settings, self.dht)
        self.telemetry.start_monitor(checks=self.readiness)
        self.manifest = await self.dht.wait_manifest(self.manifest_timeout)
        await check_clock(self.dht)  # a clock minutes behind would make this peer silently invisible
        self._auth = await RunAuth.join(self.dht, self.settings.key, on_revoked=self._on_key_revoked)
        # on a keyed run every handler but ``present`` refuses a caller without a token before its body
        self._transport = P2PTransport(await self.dht.dht.replicate_p2p(),
                                       gate=self._auth.gate if self._auth is not None else None,
                                       addresses=self.dht.relayed)
        if self._auth is not None:
            await self._transport.serve(PRESENT, self._auth.gate.rpc_present, public=True,
                                        max_request_bytes=PUBLIC_REQUEST_BYTES)
            self._auth.start()
        if net.channel:
            await self._open_channel()
        await serve_echo(self._transport)  # joining peers time their links against this one
        if behind_nat(self.dht.visible_maddrs(), net.initial_peers, net.reachability):
            await self._hold_relay_slot()
        self.measurement = await self._measure(self.manifest)
        self._compose()
        span = await self._claim()
        await self.host.serve_span(span)
        await self._serve()
        await self.host.announce_online()
        self._tasks.spawn(self._refresh_forever(), name="peer-record-refresh")
        self.resync = ResyncWatch(self.dht.stage_records, self.host.served_executors,
                                  StageClient(self._replica_transport()), self.host.identity, self.peer_id)
        self.resync.start()
        for stage in self.slots:  # the trainers count a newcomer in a step only once they have read its record
            self.resync.nudge(stage)
        self._watcher = RunWatcher(self.dht, self._metrics_report, on_change=self._on_run_state,
                                   on_control=self._auth.follow if self._auth is not None else None)
        self._watcher.start()
        if self._may_rebalance:
            self.start_rebalancing()
        logger.info("serving %s (layers %s) at %.0f tokens/s per stage", span, span_layers(self.manifest, span),
                    self.record.throughput)

    async def _open_channel(self) -> None:
        """Call and serve over direct data channels (``net.channel``): a listener on ``channel_host``
        (the p2p host by default), offered at the announced host, or the host the p2p node is seen at."""
        net = self.settings.network
        identity = Identity(self.dht.peer_id, self.dht.signing_key)
        self._transport.use_channel(identity)
        self._transport.alive = self.dht.dht.is_alive
        await self._transport.open_channel(ChannelServer(
            identity, net.channel_host or net.host, net.channel_port, tls=net.channel_tls,
            announce=channel_hosts(net.announce_host, net.channel_host or net.host, self.maddrs)))

    async def _hold_relay_slot(self) -> None:
        """Behind NAT: a slot on a relay (a bootstrap first, then reachable peers), its circuit
        address put in this peer's records; a relay that dies is replaced at the next renewal."""
        def on_change(reservation: Reservation | None) -> None:
            self.dht.circuit_maddrs = [] if reservation is None else [reservation.address(self.peer_id)]
            if self.host is not None and self.host.slots:
                self._tasks.spawn(self.host.refresh(), name="peer-record-after-relay-change")

        self.relay_slot = RelaySlot(self._transport.p2p, self.peer_id, self._relay_candidates, on_change)
        deadline = asyncio.get_running_loop().time() + RELAY_WAIT
        while await self.relay_slot.acquire() is None and asyncio.get_running_loop().time() < deadline:
            logger.info("behind NAT, no relay gives a slot yet (%s); asking again", self.relay_slot.last_error)
            await asyncio.sleep(2.0)
        if self.relay_slot.current is None:
            logger.warning("behind NAT and no relay gives a slot: %s", self.relay_slot.last_error)
        self._tasks.spawn(self.relay_slot.keep(), name="relay-slot")

    async def _relay_candidates(self) -> list[str]:
        """The direct address of every peer that is not relayed itself, then the initial peers: relayed
        bytes are spread over the volunteers, the bootstrap's link is kept for the last."""
        found: list[str] = []
        if self.manifest is not None:
            for records in (await self.dht.all_records(self.manifest.num_stages)).values():
                for record in records:
                    direct = [a for a in record.maddrs if not is_relayed(a) and "/p2p/" in a]
                    if record.peer_id != self.peer_id and direct and len(direct) == len(record.maddrs):
                        found.append(best_address(direct))
        return list(dict.fromkeys(found + list(self.settings.network.initial_peers)))

    def _compose(self) -> None:
        """The host, router and rebalancer of this peer, once it has joined and measured itself."""
        self.host = StageHost(
            self.settings, self.dht, self.manifest, self.measurement, stage_bytes=self._stage_bytes,
            memory=self._memory, transport=self._transport, auth=self._auth,
            replica_transport=self._replica_transport, telemetry=self.telemetry,
            gone=lambda: self.rebalancer.gone(), on_step_failed=self._on_step_failed,
            device=self.device, offload_optimizer=self.offload_optimizer,
        )
        self.delegate = DelegateHost(self.host)
        self.router = StageRouter(self.host, slowdown=self.settings.peer.slowdown)
        self.rebalancer = Rebalancer(self.settings, self.dht, self.manifest, self.measurement, self.host,
                                     self.router, on_moved=self._on_moved)

    async def _claim(self) -> Span:
        """Claim the span placement chooses (``loading``); peers that found a stage nobody serves (a new
        run, or a hole) settle their claims with those joining at the same moment."""
        span = await self.rebalancer.choose_span()
        logger.info("claiming %s, layers %s of %s", span, span_layers(self.manifest, span), self.manifest.model)
        await self.host.claim_stages(span)
        if self.settings.peer.stage is None and self.rebalancer.found_empty:
            span = await self.rebalancer.settle_claim(span)
        return span

    async def _serve(self) -> None:
        """Register the handlers (once: they dispatch to whichever stage this peer serves now) and start
        the ledger. A keyed run lets only callers that presented a token through (the transport's
        gate, before a request is read), so telemetry counts only what passed it (a refused call is no
        work). A pushed hop goes through the same (counted) forward or backward; the push itself is
        not counted."""
        transport = self.telemetry.observe(self._transport)
        await self.router.register(transport)
        self.push = PushService(self.peer_id, self.router.local(transport), self._replica_transport())
        await self.push.register(self._transport)
        self.telemetry.start_serving(self.stages, self.host.step_of, self._replica_transport(),
                                     counts=lambda stage: stage not in self.hosted)

    def start_rebalancing(self) -> None:
        """Re-evaluate this peer's stage every ``rebalance_period`` (started on join unless the stage is
        pinned; a pinned peer may be let loose later). Idempotent."""
        self.rebalancer.start(self._tasks)

    def _on_moved(self, added: list[int]) -> None:
        self.telemetry.follow_stages(self.stages)
        if self.resync is not None:
            for stage in added:
                self.resync.nudge(stage)

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

    # -- measuring ---------------------------------------------------------------------------------

    async def _measure(self, manifest: Manifest) -> Measurement:
        """Compute (cached), links and memory, with progress for ``swarm join``."""
        peer = self.settings.peer
        source = await asyncio.to_thread(resolve_model, manifest.model)
        config, dtype = source.config, compute_dtype(manifest.dtype)
        device = self.device
        self._memory = available_memory(device, int(peer.memory) if peer.memory else None)
        self._stage_bytes = self._memory_plan(config, manifest, dtype)
        largest = max(manifest.stages, key=len)
        key = {"model": manifest.config_hash, "layers": len(largest), "dtype": manifest.dtype, "device": str(device),
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

    def _memory_plan(self, config, manifest: Manifest, dtype: torch.dtype) -> list[int]:
        """Each stage's bytes on this peer's device (weights, gradients, AdamW state, a full queue's
        activations), and whether AdamW's state goes to host memory (``offload_optimizer``: on
        ``auto``, when the largest stage fits the device only without it)."""
        peer = self.settings.peer
        step_tokens = peer.step_tokens or manifest.target_batch_size * TOKENS_PER_SAMPLE
        tokens = queue_tokens(peer.queue_size, peer.cache_size, step_tokens, manifest.num_stages)
        full = [stage_bytes(config, layers, dtype, queue_tokens=tokens) for layers in manifest.stages]
        lean = [stage_bytes(config, layers, dtype, queue_tokens=tokens, offload_optimizer=True)
                for layers in manifest.stages]
        self.offload_optimizer = offload_wanted(
            peer.offload_optimizer, free=self._memory if self.device.type == "cuda" else None,
            resident=max(lean), optimizer=max(full) - max(lean))
        if self.offload_optimizer:
            logger.info("AdamW's state stays in host memory (offload_optimizer=%s)", peer.offload_optimizer)
        return lean if self.offload_optimizer else full

    def _report(self, what: str, done: float) -> None:
        if self._progress is not None:
            self._progress(what, done)

    def _replica_transport(self) -> AuthedTransport | P2PTransport:
        """For calls to other peers' gated handlers (a replica's state): on a keyed run they present
        this peer's token first, as a trainer does, else the replica refuses them."""
        return self._transport if self._auth is None else AuthedTransport(self._transport, self._auth.token_text)

    def readiness(self) -> dict[str, bool]:
        """``/ready`` of the metrics port: the DHT is up, a stage is loaded and announced online, and a
        bootstrap of the run announced itself lately (``RunWatcher.bootstrap_reachable``)."""
        return {"dht": self.dht is not None and self.dht.dht.is_alive(),
                "stage": self.record is not None and self.record.state == PeerState.ONLINE,
                "bootstrap": self._watcher is not None and self._watcher.bootstrap_reachable()}

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(RECORD_REFRESH)
            try:
                await self.host.refresh()
            except Exception as e:  # a DHT hiccup must not stop serving; the next refresh retries
                logger.warning("refreshing the DHT record failed: %s", e)

    async def stop(self, *, final_checkpoint: bool = True) -> None:
        """Withdraw from the DHT and release everything. Safe to call more than once, also while a
        stop runs (every call waits for the one shutdown; the first call's ``final_checkpoint``
        holds). With ``final_checkpoint`` the steps since the last checkpoint are saved and uploaded
        first (bounded)."""
        await asyncio.shield(self._begin_stop(final_checkpoint=final_checkpoint))

    def _begin_stop(self, *, final_checkpoint: bool) -> asyncio.Future:
        """The one shutdown of this peer, started by the first call (a task of its own, so that a
        callback of a part being stopped can start it)."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._shutdown(final_checkpoint))
        return self._stopping

    async def _shutdown(self, final_checkpoint: bool) -> None:
        with stacks_if_slow(STOP_REPORT, "stopping this peer"):
            await self._shut_down_parts(final_checkpoint)
        self._mark_closed()
        logger.info("peer stopped")

    async def _shut_down_parts(self, final_checkpoint: bool) -> None:
        for part in (self._watcher, self._auth, self.resync):
            if part is not None:
                await part.stop()
        await self._tasks.close()
        if self.host is not None:
            await self.host.stop_checkpoints()
        if final_checkpoint and self.checkpointers():
            await asyncio.gather(*(checkpointer.final(timeout=60.0) for checkpointer in self.checkpointers()))
        if self.telemetry is not None:  # first: its last ledger window still goes out over the transport
            await self.telemetry.stop()
        if self.host is not None:
            await self.host.withdraw_all()
        if self._transport is not None:
            await self._transport.close()
        if self.host is not None:
            await self.host.close()
        await bounded(off_loop(self._compute.shutdown, wait=True, cancel_futures=True), SLOT_STOP, "the compute thread")
        if self.dht is not None:
            await bounded(asyncio.to_thread(self.dht.shutdown), 10, "the DHT")

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

    def _on_step_failed(self, stage: StageIndex) -> None:
        if self.resync is not None:
            self.resync.nudge(stage)

    def _on_key_revoked(self) -> None:
        if self._stopping is None:
            logger.error("this peer's API key was revoked: it leaves the swarm")
            self.failure = "this peer's API key was revoked by the run owner: ask them for a new one"
            self._begin_stop(final_checkpoint=True)

    def _on_run_state(self, state: RunState) -> None:
        if state == RunState.STOPPED and self._stopping is None:
            logger.warning("the run owner stopped the run: this peer leaves the swarm")
            self._begin_stop(final_checkpoint=True)
        elif state == RunState.PAUSED:
            logger.warning("the run owner paused the run: serving stays up, trainers wait")

    async def _in_compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn, *args)
