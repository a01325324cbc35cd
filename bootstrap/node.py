"""``BootstrapNode``: the run's first contact. Publishes the manifest and keeps a stable address.

It also owns the run's durable state (``bootstrap.state.StateDB``, ``state.db`` in the state dir):
it publishes the run state that ``swarm run pause|resume|stop`` set there (polled every second), and
every ``bootstrap.metrics_interval`` seconds folds the trainers' and peers' metrics reports from the
DHT into the metrics history, the step counter and the contribution tallies.

Its libp2p identity and its port are kept in the state dir, so after a restart it has the same
multiaddr and the peers' ``--bootstrap`` lines stay valid; the manifest is kept there too, so a
restarted bootstrap republishes the same run rather than starting a new one.

A run may have several bootstraps: ``--mirror <addr>`` starts one that takes the run's manifest
from the bootstrap at ``addr`` and signs tokens with the same *authority* key (``--authority-key``,
a copy of the first one's ``authority.key``). Each keeps its own ``state.db`` and they sync keys and
run state over ``swarm.bootstrap.sync`` (``bootstrap.mirror``, rules in ``bootstrap.sync``); each
publishes a ``{run}_bootstraps`` record, where joining peers find one to ask for a token.

The owner's fleet view: every metrics round it also keeps each peer's live figures in ``state.db``
(``peer_samples``, pruned after ``bootstrap.metrics_retention``), raises alerts (``bootstrap.alerts``:
audited, and posted to ``bootstrap.alert_webhook``), and applies the owner's bans and kicks
(``ban_peer``): the banned list travels in the run-control record, so every view leaves the peer out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path

from hivemind.utils.crypto import RSAPrivateKey

from bootstrap.alerts import AlertBook, Progress, alerts_of, post_alert
from bootstrap.bans import BanEnforcer
from bootstrap.checkpoints import CheckpointStore
from bootstrap.data import DataService
from bootstrap.leases import LeaseBook
from bootstrap.credit import DEFAULT_MAX_POSITIONS, credit_cap, max_positions, round_step, step_advance, tokens_per_step
from bootstrap.mirror import BootstrapPeering, check_signer, load_authority
from bootstrap.telemetry import BootstrapTelemetry
from bootstrap.metrics import RoundSummary, summarize
from bootstrap.state import PeerSample, StateDB
from bootstrap.tokens import TokenService
from hivemind.utils import get_dht_time

from dht.auth import TokenRecordValidator, issue_token
from net.admission import PUBLIC_REQUEST_BYTES, CallerLimits
from net.auth import PRESENT, TOKEN, AuthedTransport, AuthGate
from net.transport import P2PTransport
from peers.data.spec import spec_from_settings
from peers.telemetry.status import Status, collect_status
from dht.control import (
    CONTROL_REFRESH,
    find_bootstraps,
    get_bootstraps,
    get_control,
    get_metrics,
    publish_control,
)
from dht.schemas import RunControl, RunState
from dht.records import MANIFEST_REFRESH, SwarmDHT
from dht.schemas import Manifest, OptimizerSettings, PeerRecord, PeerState
from shards.assignment import stage_boundaries
from shards.families import family_of, num_layers
from shards.source import resolve_model
from core.config import SwarmSettings, offers_relay, relay_limits
from core.errors import ConfigError, PeerUnavailable, SwarmError
from core.types import PeerId

__all__ = ["BootstrapNode", "build_manifest", "peer_samples"]

logger = logging.getLogger(__name__)

_KNOWN_PEERS = 8


def _online_in(records: dict[int, list[PeerRecord]]) -> set[str]:
    """Peers an online stage record names: its server, and the delegator it serves for (whose ledger
    holds that work)."""
    return {peer for found in records.values() for r in found if r.state == PeerState.ONLINE
            for peer in (r.peer_id, r.delegate_of) if peer}


def build_manifest(settings: SwarmSettings) -> Manifest:
    """Read the model's config (only config.json) and cut its layers into the requested stages."""
    boot = settings.bootstrap
    if not boot.model:
        raise ConfigError("the bootstrap needs --model (a hub id or a directory with config.json)")
    dataset = spec_from_settings(settings.data)
    source = resolve_model(boot.model)
    family_of(source.config)  # refuse an unsupported architecture before anyone joins
    layers = num_layers(source.config)
    if boot.num_stages > layers:
        raise ConfigError(f"--num-stages {boot.num_stages} is more than the model's {layers} layers")
    model = str(Path(boot.model).resolve()) if Path(boot.model).is_dir() else boot.model
    return Manifest(
        run_id=settings.run_id,
        model=model,
        config_hash=source.config_hash,
        num_layers=layers,
        stages=stage_boundaries(layers, boot.num_stages),
        target_batch_size=boot.target_batch_size,
        optimizer=OptimizerSettings(lr=boot.lr, weight_decay=boot.weight_decay),
        dtype=boot.dtype,
        wire=boot.wire,
        dataset=dataset,
    )


def peer_samples(status: Status, now: float) -> list[PeerSample]:
    """One row of live figures per peer of ``status`` (``state.db``'s ``peer_samples``)."""
    return [PeerSample(at=now, peer_id=p.peer_id, throughput=p.throughput, latency_ms=p.latency_ms,
                       cpu_percent=p.hardware.cpu_percent, gpu_util_percent=p.hardware.gpu_util_percent,
                       gpu_memory_used_gib=p.hardware.gpu_memory_used_gib,
                       gpu_memory_gib=p.hardware.gpu_memory_gib, gpu_temperature_c=p.hardware.gpu_temperature_c,
                       gpu_power_w=p.hardware.gpu_power_w) for p in status.peers]


class BootstrapNode:
    """A DHT peer with a persistent identity that keeps the run's manifest published."""

    def __init__(self, settings: SwarmSettings):
        self.settings = settings
        self.state_dir = settings.state_dir.expanduser() / settings.run_id
        self.dht: SwarmDHT | None = None
        self.manifest: Manifest | None = None
        self._task: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopped = False
        self.checkpoints: CheckpointStore | None = None
        self.bans: BanEnforcer | None = None
        self.telemetry: BootstrapTelemetry | None = None
        self.db: StateDB | None = None
        self.control: RunControl | None = None
        self._peers_seen: set[str] = set()
        self.authority = None
        self.dashboard = None  # a bootstrap.dashboard.DashboardServer once started
        self.data: DataService | None = None  # the primary's data leases
        self.admin = None
        self._status_cache: tuple[float, Status] | None = None
        self._transport: P2PTransport | None = None
        self._keys_required = not settings.bootstrap.open
        self.peering: BootstrapPeering | None = None
        self.gate: AuthGate | None = None  # a keyed run: every handler but present/token checks callers
        self.limits = CallerLimits()  # per caller, over all of this node's handlers
        self._own_token: tuple[str, float] | None = None
        self._round_step: int | None = None  # the run's step at the last metrics round (bootstrap.credit)
        self._max_positions = DEFAULT_MAX_POSITIONS
        self.alerts = AlertBook()
        self._step_seen: tuple[int, float] = (0, time.time())  # the step, and since when it has not moved
        self._sampled_at: float | None = None  # the status time of the last peer samples kept

    async def start(self) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create state dir {self.state_dir}: {e.strerror}") from None
        self.db = StateDB(self.state_dir / "state.db")  # first: a corrupt state stops us before the DHT
        mirroring = self.mirror is not None and not (self.state_dir / "manifest.json").is_file()
        if not mirroring:
            self.manifest = self._load_or_build_manifest()
        self.authority = await asyncio.to_thread(self._load_authority)
        self.dht = await self._start_dht()
        self._save_port()
        await self._join_bootstraps(mirroring)
        if not await self.dht.publish_manifest(self.manifest):
            logger.warning("the manifest was not stored in the DHT; retrying in the background")
        self._task = asyncio.create_task(self._republish_forever(), name="manifest-republish")
        self.checkpoints = CheckpointStore(self.state_dir / "checkpoint-store", self.manifest)
        await self.checkpoints.start(self.dht, gate=self.gate, limits=self.limits)
        self._max_positions = await asyncio.to_thread(self._read_max_positions)
        self.telemetry = BootstrapTelemetry(self.settings, self.dht, self.state_dir, cap=self.credit_cap,
                                            audit=self.db.audit)
        await self.telemetry.start(gate=self.gate, limits=self.limits)
        self.bans = BanEnforcer(self.dht, self.db, self.telemetry.book, self.manifest.num_stages,
                                lambda: self.authority.get_public_key() if self.keys_required else None)
        self.telemetry.book.banned.update(self.db.banned_peers())  # the owner's bans hold across restarts
        await self._publish_control(*self._wanted_control())
        if self.mirror is None:
            self.data = DataService(LeaseBook(self.db, ttl=self.settings.data.lease_ttl), self.dht,
                                    self.manifest.dataset, self.telemetry.metrics.registry)
            await self.data.start(self._transport)
        self._tasks = [
            asyncio.create_task(self._control_forever(), name="run-control"),
            asyncio.create_task(self._collect_forever(), name="metrics-collect"),
        ]
        if self.settings.bootstrap.dashboard:
            await self._start_dashboard()
        await self.peering.publish_record(self._dashboard_url())
        self._tasks.append(asyncio.create_task(self.peering.run_forever(self._dashboard_url), name="bootstrap-sync"))
        mirror = f", mirror of {self.mirror}" if self.mirror else ""
        self.db.audit("bootstrap", "bootstrap.start",
                      f"run {self.settings.run_id} at {self.maddrs[0] if self.maddrs else '?'}{mirror}")

    async def _start_dht(self) -> SwarmDHT:
        """Start the DHT node; after a restart, rejoin through the peers seen last time (saved in
        state.db), since the swarm's nodes dropped this one from their tables while it was down and
        would not call it again. If none of them answers, start alone as on the first run."""
        net = self.settings.network
        port = net.port or self._saved_port()
        first = [*([self.mirror] if self.mirror else []), *net.initial_peers]
        known = [a for a in json.loads(self.db.get_meta("known_peers", "[]") or "[]") if a not in first]

        def create(initial: list[str]) -> SwarmDHT:
            return SwarmDHT.create(self.settings.run_id, initial_peers=initial, host=net.host, port=port,
                                   announce_host=net.announce_host, identity_path=self.state_dir / "identity.key",
                                   signer_key=self.authority, relay=offers_relay(net), relay_limits=relay_limits(net),
                                   in_process=not net.dht_process)

        if self.mirror is not None and self.manifest is None:  # a new mirror: the run is where it points
            try:
                return await asyncio.to_thread(create, first)
            except PeerUnavailable as e:
                raise PeerUnavailable(
                    f"cannot reach the bootstrap to mirror at {self.mirror}: {e}. Check the address (the "
                    "`swarm join --bootstrap` line the first bootstrap printed) and that it is running"
                ) from None
        if known or self.mirror is not None:
            try:
                return await asyncio.to_thread(create, [*first, *known])
            except PeerUnavailable as e:
                logger.info("none of the %d peers seen before the restart answered (%s); starting afresh",
                            len(first) + len(known) - len(net.initial_peers), e)
        return await asyncio.to_thread(create, list(net.initial_peers))

    async def _count_online_steps(self, reports: list, online: set[str]) -> None:
        """Credit each peer online this round with the run's step advance since the last round (the
        ledger's cap, ``bootstrap.credit``)."""
        step = round_step([r.step for r in reports])
        advance = step_advance(self._round_step, step)
        if step is not None:
            self._round_step = max(step, self._round_step or 0)
        if advance and online:
            await asyncio.to_thread(self.db.add_online_steps, sorted(online), advance)

    def credit_cap(self, peer_id: PeerId) -> int:
        """The most ledger tokens ``peer_id`` can hold (``bootstrap.credit``)."""
        per_step = tokens_per_step(self.manifest.target_batch_size, self._max_positions)
        return credit_cap(per_step, self.db.online_steps().get(peer_id, 0))

    def _read_max_positions(self) -> int:
        try:
            return max_positions(resolve_model(self.manifest.model).config)
        except Exception as e:  # a mirror without the model files: the stated default bounds the cap
            logger.warning("cannot read the model config of %s (%s): the ledger cap assumes %d positions",
                           self.manifest.model, e, DEFAULT_MAX_POSITIONS)
            return DEFAULT_MAX_POSITIONS

    async def _remember_peers(self, records: dict[int, list[PeerRecord]]) -> None:
        """Keep a few addresses of live peers in state.db, to rejoin through after a restart."""
        own = set(self.maddrs)
        addresses = [a for rs in records.values() for r in rs if r.state != PeerState.OFFLINE
                     for a in r.maddrs if "/p2p/" in a and a not in own]
        others = [a for record, _ in await get_bootstraps(self.dht) for a in record.maddrs[:1] if a not in own]
        addresses = [*others, *(a for a in addresses if a not in others)]
        if addresses:
            await asyncio.to_thread(self.db.set_meta, "known_peers", json.dumps(addresses[:_KNOWN_PEERS]))

    def _load_authority(self) -> RSAPrivateKey:
        return load_authority(self.state_dir / "authority.key", self.settings.bootstrap.authority_key,
                              mirror=self.mirror)

    async def _join_bootstraps(self, mirroring: bool) -> None:
        """Take the manifest (a new mirror) and whether keys are required (any mirror), serve the
        sync (and tokens), and catch up with the run's other bootstraps before anyone is served."""
        if mirroring:
            self.manifest = await self._mirror_manifest()
        if self.mirror is not None:
            await self._follow_keys_required()
        await self._serve_sync()
        await self.peering.catch_up(required=mirroring)
        if mirroring:  # only now: a mirror that never synced must not start later as if it had
            (self.state_dir / "manifest.json").write_text(self.manifest.model_dump_json(indent=2))
        if self.keys_required:
            await self._serve_tokens()

    async def _mirror_manifest(self) -> Manifest:
        """A new mirror takes the run's manifest from the DHT, once it has checked that the
        authority key it was given is the one that signed it (saved after the first sync)."""
        manifest = await self.dht.wait_manifest(timeout=20.0)
        signers = {owner for _, owner in await find_bootstraps(self.dht)}
        check_signer(self.authority, signers, run_id=self.settings.run_id, source=self.mirror)
        logger.info("mirroring run %r (%s) of the bootstrap at %s", manifest.run_id, manifest.model, self.mirror)
        return manifest

    async def _follow_keys_required(self, wait: float = 10.0) -> None:
        """A mirror requires keys exactly when the run does (the primary's ``--open`` decides): read
        from the run-control record, remembered in state.db for restarts while no one publishes it."""
        deadline = asyncio.get_running_loop().time() + wait
        control = await get_control(self.dht)
        while control is None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.5)
            control = await get_control(self.dht)
        if control is not None:
            await asyncio.to_thread(self.db.set_meta, "keys_required", "1" if control.keys_required else "0")
        saved = self.db.get_meta("keys_required")
        if saved is not None:
            self._keys_required = saved == "1"

    def _load_or_build_manifest(self) -> Manifest:
        path = self.state_dir / "manifest.json"
        if path.is_file():
            saved = Manifest.model_validate_json(path.read_text())
            wanted = self.settings.bootstrap.model
            if wanted and build_manifest(self.settings).config_hash != saved.config_hash:
                raise ConfigError(
                    f"{self.state_dir} holds run {saved.run_id!r} of {saved.model}; use another "
                    "--state-dir or --run to start a run of a different model"
                )
            dataset = spec_from_settings(self.settings.data)
            if dataset is not None and dataset != saved.dataset:
                raise ConfigError(f"{self.state_dir} holds run {saved.run_id!r} of dataset "
                                  f"{saved.dataset.source if saved.dataset else '(none)'}; a run keeps its dataset "
                                  "(its shards' positions are kept with it): use another --state-dir or --run")
            logger.info("resuming run %r from %s", saved.run_id, path)
            return saved
        manifest = build_manifest(self.settings)
        path.write_text(manifest.model_dump_json(indent=2))
        return manifest

    def _saved_port(self) -> int:
        path = self.state_dir / "port"
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text())
        return 0

    def _save_port(self) -> None:
        for addr in self.dht.visible_maddrs():
            parts = addr.split("/")
            if "tcp" in parts:
                (self.state_dir / "port").write_text(parts[parts.index("tcp") + 1])
                return

    async def _republish_forever(self) -> None:
        while True:
            await asyncio.sleep(MANIFEST_REFRESH)
            try:
                await self.dht.publish_manifest(self.manifest)
            except Exception as e:  # the DHT may be briefly unreachable; the next round retries
                logger.warning("republishing the manifest failed: %s", e)

    def _dashboard_url(self) -> str | None:
        return self.dashboard.url if self.dashboard is not None else None

    async def _start_dashboard(self) -> None:
        """The dashboard is for people; the run does not need it, so a taken port is a warning."""
        from bootstrap.admin import AdminAuth, set_admin_password  # FastAPI and argon2: only when served
        from bootstrap.dashboard import DashboardServer, create_app

        password = os.environ.get("SWARM_ADMIN_PASSWORD")
        if password:
            user = os.environ.get("SWARM_ADMIN_USER", "admin")
            await asyncio.to_thread(set_admin_password, self.db, user, password, actor="env:SWARM_ADMIN_PASSWORD")
        self.admin = AdminAuth(self.db)
        boot = self.settings.bootstrap
        app = create_app(self.db, self.admin, run_id=self.settings.run_id, join_command=self.join_command,
                         maddrs=lambda: self.maddrs, keys_required=self.keys_required, status=self.status_report,
                         checks=self.readiness, fleet=self)
        server = DashboardServer(app, boot.dashboard_host or self.settings.network.host, boot.dashboard_port,
                                 tls=boot.tls())
        try:
            await server.start()
        except (OSError, SystemExit) as e:  # uvicorn exits on a bind error
            logger.warning("the dashboard did not start on port %d (%s); the run goes on without it",
                           boot.dashboard_port, e or "port in use?")
            await server.stop()
            return
        self.dashboard = server
        if not self.admin.configured:
            logger.warning("no admin password yet: set SWARM_ADMIN_PASSWORD or run `swarm admin password` "
                           "to log in to the dashboard")

    def readiness(self) -> dict[str, bool]:
        """``/ready`` of the dashboard: the DHT is up, the manifest is kept published, state.db reads."""
        database = True
        try:
            self.db.run_state()
        except SwarmError:
            database = False
        return {"dht": self.dht is not None and self.dht.dht.is_alive(),
                "manifest": self.manifest is not None and self._task is not None and not self._task.done(),
                "state_db": database}

    async def ban_peer(self, peer_id: PeerId, *, actor: str, kick: bool = False) -> str:
        """The owner's action on a peer. ``kick``: revoke the key it joined with, so it leaves and its
        records are refused (a keyed run only: an open run has no key to take). A ban does that too
        on a keyed run, and puts it on the banned list for good (kept in state.db, published in the
        run-control record): no more credit, left out of every view. Returns what was done."""
        if kick and not self.keys_required:
            raise ConfigError("an open run has no keys to revoke, so a peer cannot be kicked: ban it instead")
        done = []
        if not kick:
            await asyncio.to_thread(self.db.ban_peer, peer_id, actor=actor, action="peer.ban")
            self.telemetry.book.banned.add(peer_id)
            done.append("banned")
        if self.keys_required:
            key_id = await self.bans.revoke_key_of(peer_id, actor)
            done.append(f"key {key_id} revoked" if key_id else "no key of it found in the DHT")
        if kick:
            await asyncio.to_thread(self.db.audit, actor, "peer.kick", f"{peer_id}: {done[-1]}")
        self._status_cache = None
        return "; ".join(done)

    async def status_report(self, max_age: float = 2.0) -> Status:
        """``swarm status --json``'s data, from this node's DHT (cached for ``max_age`` seconds)."""
        now = asyncio.get_running_loop().time()
        if self._status_cache is None or now - self._status_cache[0] > max_age:
            self._status_cache = (now, await collect_status(self.dht, manifest_timeout=5.0))
        return self._status_cache[1]

    @property
    def keys_required(self) -> bool:
        return self._keys_required

    @property
    def mirror(self) -> str | None:
        """The address of the bootstrap this one mirrors (``--mirror``), or None."""
        return self.settings.bootstrap.mirror

    @property
    def authority_public_key(self) -> bytes:
        return self.authority.get_public_key().to_bytes()

    async def _serve_sync(self) -> None:
        """Serve the sync with the run's other bootstraps (``bootstrap.mirror``). On a keyed run it is
        gated like every other handler: a bootstrap presents a token it signs itself (it holds the
        authority key), so the sync's own signature is a second check, not the only one."""
        if self.keys_required:
            revoked = frozenset(k.id for k in self.db.list_keys() if k.revoked is not None)
            self.gate = AuthGate(self.authority_public_key, revoked)
        self._transport = P2PTransport(await self.dht.dht.replicate_p2p(), gate=self.gate, limits=self.limits)
        calls = self._transport
        if self.gate is not None:
            await self._transport.serve(PRESENT, self.gate.rpc_present, public=True,
                                        max_request_bytes=PUBLIC_REQUEST_BYTES)
            calls = AuthedTransport(self._transport, self.own_token)
        self.peering = BootstrapPeering(self.dht, self.db, self.authority, calls, mirror=self.mirror,
                                        interval=self.settings.bootstrap.sync_interval)
        await self.peering.serve()

    def own_token(self) -> str:
        """An access token for this bootstrap itself (it holds the authority key), renewed at half-life:
        what it presents to the run's other bootstraps and peers."""
        now, ttl = get_dht_time(), self.settings.bootstrap.token_ttl
        if self._own_token is None or self._own_token[1] - now < ttl / 2:
            public_key = self.dht._signer.local_public_key[len(b"[owner:"):-1]
            self._own_token = (issue_token(self.authority, "bootstrap", self.dht.peer_id, public_key, now + ttl),
                               now + ttl)
        return self._own_token[0]

    async def _serve_tokens(self) -> None:
        """Exchange keys for tokens (``swarm.auth.token``), and enforce tokens on records stored here."""
        self.dht.dht.add_validators([TokenRecordValidator(self.settings.run_id, self.authority_public_key)])
        service = TokenService(self.db, self.authority, self.settings.bootstrap.token_ttl)
        await self._transport.serve(TOKEN, service.rpc_token, public=True, max_request_bytes=PUBLIC_REQUEST_BYTES)

    def _wanted_control(self) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        """What state.db says now: the run state, the revoked key ids and the banned peers."""
        revoked = tuple(sorted(k.id for k in self.db.list_keys() if k.revoked is not None))
        return self.db.run_state(), revoked, tuple(self.db.banned_peers())

    async def _publish_control(self, state: str, revoked: tuple[str, ...], banned: tuple[str, ...] = ()) -> None:
        if self.keys_required and (self.control is None or tuple(self.control.revoked) != revoked):
            self.dht.dht.add_validators([TokenRecordValidator(self.settings.run_id, self.authority_public_key,
                                                              frozenset(revoked))])
            if self.gate is not None:
                self.gate.update(self.authority_public_key, frozenset(revoked))
        # changed_at is when the owner last changed something (not when this copy was published), so
        # two bootstraps that have synced publish equal records and the newer change always wins
        changed_at = await asyncio.to_thread(lambda: max(self.db.run_state_row()[1], self.db.keys_changed_at(),
                                                         self.db.banned_row()[1]))
        self.telemetry.book.banned.update(banned)  # a ban synced from another bootstrap: no credit here either
        self.control = RunControl(state=RunState(state), changed_at=changed_at,
                                  keys_required=self.keys_required, revoked=list(revoked), banned=list(banned))
        self._status_cache = None  # the views leave revoked and banned peers out from now on
        if not await publish_control(self.dht, self.control):
            logger.warning("the run state was not stored in the DHT; retrying in a second")
            self.control = None

    async def _control_forever(self, period: float = 1.0) -> None:
        """Publish the run state and revocations when ``state.db`` changes them (the CLI, the
        dashboard), and refresh the record well before it expires."""
        last_publish = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(period)
            try:
                wanted = await asyncio.to_thread(self._wanted_control)
                stale = asyncio.get_running_loop().time() - last_publish > CONTROL_REFRESH
                current = None if self.control is None else (
                    self.control.state.value, tuple(self.control.revoked), tuple(self.control.banned))
                if current != wanted or stale:
                    if current is not None and current != wanted:
                        logger.info("run state: %s; revoked keys: %s; banned peers: %d", wanted[0],
                                    ", ".join(wanted[1]) or "none", len(wanted[2]))
                    await self._publish_control(*wanted)
                    last_publish = asyncio.get_running_loop().time()
            except Exception as e:  # the DHT or the database is briefly busy: the next second retries
                logger.warning("publishing the run state failed: %s", e)

    async def _collect_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.bootstrap.metrics_interval)
            try:
                await self.collect_once()
            except Exception as e:  # a DHT hiccup loses one round of history, not the bootstrap
                logger.warning("collecting metrics failed: %s", e)

    async def collect_once(self) -> bool:
        """One round: metrics reports from the DHT into ``state.db``; joins and leaves audited; new ban
        reports applied (``bootstrap.bans``)."""
        await self.bans.check_once()
        reports = await get_metrics(self.dht)
        peers = {r.peer_id for r in reports if r.role == "peer"}
        for peer_id in sorted(peers - self._peers_seen):
            await asyncio.to_thread(self.db.audit, peer_id, "peer.join", "")
        for peer_id in sorted(self._peers_seen - peers):
            await asyncio.to_thread(self.db.audit, peer_id, "peer.leave", "no report for a whole TTL")
        self._peers_seen = peers
        records = await self.dht.all_records(self.manifest.num_stages)
        await self._count_online_steps(reports, peers | _online_in(records))
        await self._remember_peers(records)
        summary = summarize(reports)
        if summary is not None:
            await asyncio.to_thread(
                self.db.record_metrics, step=summary.step, loss=summary.loss,
                tokens_per_second=summary.tokens_per_second, peers=summary.peers, reports=summary.samples,
            )
        await self._fleet_round(summary, trainers=sum(r.role == "trainer" for r in reports))
        return summary is not None

    async def _fleet_round(self, summary: RoundSummary | None, *, trainers: int) -> None:
        """The fleet view's part of a metrics round: peer samples kept (once per new status) and
        pruned, alerts raised. A round whose status the DHT cannot give now is skipped whole."""
        now = time.time()
        if summary is not None and summary.step != self._step_seen[0]:
            self._step_seen = (summary.step, now)
        try:
            status = await self.status_report()
        except Exception as e:  # a DHT hiccup or timeout: skip this round (its alerts would all look cleared)
            logger.info("no status this round (%s): the fleet view waits", e)
            return
        if status.time != self._sampled_at:
            self._sampled_at = status.time
            await asyncio.to_thread(self.db.record_peer_samples, peer_samples(status, now),
                                    retention=self.settings.bootstrap.metrics_retention, now=now)
        progress = Progress(step=self._step_seen[0], step_since=self._step_seen[1],
                            loss=summary.loss if summary is not None else None,
                            run_state=self.db.run_state(), trainers=trainers)
        boot = self.settings.bootstrap
        for alert in self.alerts.update(alerts_of(status, progress, now=now, stall_after=boot.alert_stall)):
            logger.warning("alert: %s", alert.text)
            await asyncio.to_thread(self.db.audit, "alerts", f"alert.{alert.kind}", alert.text)
            if boot.alert_webhook:
                self._tasks.append(asyncio.create_task(
                    post_alert(boot.alert_webhook, self.settings.run_id, alert, now), name="alert-webhook"))
        self._tasks = [t for t in self._tasks if not (t.get_name() == "alert-webhook" and t.done())]

    @property
    def maddrs(self) -> list[str]:
        return self.dht.visible_maddrs() if self.dht else []

    def join_command(self) -> str:
        run = "" if self.settings.run_id == "swarm" else f" --run {self.settings.run_id}"
        key = " --key <your API key>" if self.keys_required else ""
        return f"swarm join --bootstrap {self.maddrs[0]}{run}{key}"

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.dashboard is not None:
            await self.dashboard.stop()
        for task in [self._task, *self._tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.data is not None:
            await self.data.stop()
        if self.peering is not None:
            await self.peering.withdraw()
        if self._transport is not None:
            await self._transport.close()
        if self.checkpoints is not None:
            await self.checkpoints.stop()
        if self.telemetry is not None:
            await self.telemetry.stop()
        if self.dht is not None:
            await asyncio.to_thread(self.dht.shutdown)
        if self.db is not None:
            with contextlib.suppress(Exception):  # a final audit line is nice, not essential
                self.db.audit("bootstrap", "bootstrap.stop", "")
            self.db.close()

    async def __aenter__(self) -> "BootstrapNode":
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
