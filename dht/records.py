"""``SwarmDHT``: swarm's records on top of a running ``hivemind.DHT``.

hivemind's DHT is served on a thread of this process (``_DHTThread``, the default) or in hivemind's child
process (``_DHTProcess``, ``network.dht_process``), with its p2pd either way; every call here is handed
to it and awaited as an ``MPFuture``, so the caller's event loop never blocks on the DHT.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import hivemind
import torch.multiprocessing
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from pydantic import BaseModel, ValidationError

from dht.calls import Calls, unbind_idle
from dht.schemas import (
    DataRecord,
    data_key,
    RECORD_TTL,
    Manifest,
    MetricsRecord,
    PeerRecord,
    PeerState,
    StoreRecord,
    TrainerRecord,
    manifest_key,
    telemetry_key,
    stage_key,
    store_key,
    trainers_key,
)
from dht.validators import RunSchemaValidator
from core.config import check_multiaddr
from core.errors import NoRoute, PeerUnavailable
from core.types import StageIndex

__all__ = ["SwarmDHT", "MANIFEST_TTL", "MANIFEST_REFRESH", "SHARING_STRATEGY"]

logger = logging.getLogger(__name__)

SHARING_STRATEGY = "file_descriptor"
"""How this process shares tensors with its DHT and averager children (issue 27, point 6). hivemind sets
torch's ``file_system`` strategy at import (its ``MPFuture`` state and the averager's tensors live in
shared memory), which starts a ``torch_shm_manager`` process per peer and per trainer: 60 MiB of PSS
idle. With ``file_descriptor`` no such process runs: a shared tensor is an fd, inherited by a forked
child or handed over a pipe (``multiprocessing.reduction.DupFd``). ``HIVEMIND_MEMORY_SHARING_STRATEGY``
set in the environment wins."""


def _share_by_file_descriptor() -> None:
    """Apply ``SHARING_STRATEGY`` before any tensor is shared (every DHT and averager starts after this
    module is imported). Each shared tensor holds an fd while it lives (an averager's, one per
    parameter), so the soft limit of open files is raised to the hard one (bounded)."""
    if "HIVEMIND_MEMORY_SHARING_STRATEGY" in os.environ:
        return
    torch.multiprocessing.set_sharing_strategy(SHARING_STRATEGY)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as e:  # a container's lower ceiling: the soft limit stays
            logger.debug("raising the open files limit to %d: %s", wanted, e)


_share_by_file_descriptor()


def _freeze_heap() -> None:
    """Move every live object to the collector's permanent generation, which no collection scans,
    before the DHT child is forked (issue 27, point 6). A forked child's collections otherwise write
    into the header of every object they scan, and each write copies the page under it: the DHT child,
    and the averager children forked later, each kept a private copy of most of the peer's heap
    (torch's, transformers' and the model code's objects). Garbage is collected first, so that none is
    kept for good. Done here, before a peer loads any stage, so what is frozen is what lives as long
    as the process (modules, classes, settings): a stage's weights, which a peer drops when it moves,
    stay collectable. The Python documentation's recipe for ``fork()`` without ``exec()``."""
    gc.collect()
    gc.freeze()

MANIFEST_TTL = 7 * 24 * 3600.0
"""A run's manifest lives a week in the DHT: peers go on finding the run while no bootstrap is up (a
peer cannot extend it: its signature covers the expiration). Bootstraps rewrite it every
``MANIFEST_REFRESH`` s, so the newest copy always expires last."""
MANIFEST_REFRESH = 150.0
T = TypeVar("T", TrainerRecord, MetricsRecord)
R = TypeVar("R", bound=BaseModel)
STORE_TTL = 600.0


class _DHTProcess(hivemind.DHT):
    """hivemind's DHT child process (``network.dht_process``), in a process group of its own that dies
    with its parent.

    Ctrl+C in a terminal signals the whole foreground process group. p2pd (started by this child)
    exits on SIGINT whatever it inherits, and a DHT child whose p2pd died first never finishes its
    shutdown: the parent stalls and the child is left orphaned (seen with `swarm bootstrap`). In
    their own group (p2pd inherits it), only the parent gets Ctrl+C and it stops them in order.

    hivemind has no parent-death handling: a parent killed with SIGKILL left this child and p2pd
    running. A watchdog thread here notices the parent is gone (this process was re-parented) within
    a second and takes the whole group down, p2pd included; so does SIGTERM, which is also what
    hivemind's own hard shutdown sends. (PR_SET_PDEATHSIG would fire when the *thread* that started
    the child exits, and swarm starts DHTs from worker threads.)
    """

    def __init__(self, *args, relay_flags: dict | None = None, **kwargs):
        self._relay_flags = relay_flags or {}
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        if self._relay_flags:
            _pass_daemon_flags(self._relay_flags)
        os.setpgid(0, 0)
        signal.signal(signal.SIGTERM, _kill_own_group)
        watchdog = threading.Thread(target=_watch_parent, args=(self._parent_pid,), name="parent-watchdog")
        watchdog.daemon = True
        watchdog.start()
        super().run()


class _DHTThread(hivemind.DHT):
    """hivemind's DHT served on a thread of the calling process (the default; issue 27, point 6): the
    same node, calls and futures as hivemind's child process, without a forked copy of the caller's
    heap (~180 MiB PSS for a peer, see docs/design.md).

    hivemind's control pipe is replaced by ``dht.calls.Calls`` (calls by reference). The node's p2pd is
    started here (``_daemon``), not by hivemind's ``DHTNode.create``, so that its command line takes this
    node's relay flags alone (several nodes run in one process in tests) and goes through ``_launcher``:
    p2pd in a process group of its own (Ctrl+C in a terminal reaches the caller alone, which stops the
    node in order: p2pd exits on SIGINT, and a node whose p2pd died first stalled its shutdown) that
    is killed when this thread ends, the caller's process killed with SIGKILL included."""

    _node: Any

    def __init__(self, *args: Any, relay_flags: dict | None = None, start: bool, await_ready: bool = True,
                 **kwargs: Any):
        super().__init__(*args, start=False, **kwargs)
        self._relay_flags = relay_flags or {}
        self._inner_pipe.close()
        self._outer_pipe.close()
        self._calls = Calls("the DHT")
        self._inner_pipe = self._outer_pipe = self._calls
        unbind_idle(self._ready)
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._p2p: Any = None
        if start:
            self.run_in_background(await_ready=await_ready)

    def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None:
        self._thread = threading.Thread(target=self._calls.serve_on_thread, args=(self._serve, self._close),
                                        name="dht", daemon=True)
        self._thread.start()
        if await_ready:
            self.wait_until_ready(timeout)

    def is_alive(self) -> bool:
        """Whether the node serves: its thread runs and its p2pd has not exited (a node whose daemon
        died can no longer take part in the run, see ``net.transport.P2PTransport.alive``)."""
        daemon = getattr(self._p2p, "_child", None)
        return (self._thread is not None and self._thread.is_alive()
                and (daemon is None or daemon.returncode is None))

    @property
    def daemon_pid(self) -> int | None:
        """The process id of this node's p2pd (None before it started)."""
        daemon = getattr(self._p2p, "_child", None)
        return None if daemon is None else daemon.pid

    def shutdown(self) -> None:
        """Stop the node and its p2pd, bounded: ``shutdown_timeout`` for the node, ``dht.calls.CLOSE_WAIT`` more
        for the thread to close; a thread that did not stop is named in a warning and its p2pd killed."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        if not self._calls.stop(thread, self.shutdown_timeout) and thread is not threading.current_thread():
            logger.warning("the DHT's p2p daemon is killed")
            pid = self.daemon_pid
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    async def _shutdown(self, timeout: float | None = None) -> None:
        """The node's shutdown (its handlers removed from p2pd), bounded by ``timeout``; skipped when p2pd
        is gone, where it would only wait on the dead daemon's socket (the thread's wind-down cancels the
        node's tasks either way)."""
        try:
            if self._p2p._child.returncode is None:
                await asyncio.wait_for(self._node.shutdown(), timeout)
        except asyncio.TimeoutError:
            logger.warning("the DHT node did not shut down within %g s; stopping its p2p daemon", timeout)
        finally:
            if self._stopped is not None:
                self._stopped.set()

    async def _serve(self) -> None:
        """hivemind's ``DHT.run`` on this thread's loop: start p2pd and the node, then serve calls until
        ``_shutdown``."""
        self._stopped = asyncio.Event()
        await self._calls.serve(self._start, self, self._ready, self._stopped)

    async def _start(self) -> None:
        kwargs = dict(self.kwargs)
        client_mode = kwargs.pop("client_mode", False)
        self._p2p = await _daemon(self._relay_flags).create(
            initial_peers=self.initial_peers, dht_mode="client" if client_mode else "server", **kwargs)
        self._node = await DHTNode.create(initial_peers=self.initial_peers, num_workers=self.num_workers,
                                          record_validator=self._record_validator, p2p=self._p2p,
                                          client_mode=client_mode)

    async def _close(self) -> None:
        if self._p2p is not None:
            await self._p2p.shutdown()  # the node does not own a daemon it was given


_LAUNCHER_CODE = """\
import ctypes, os, signal, sys
os.setpgid(0, 0)
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit("p2pd: its parent is gone")
os.execv(sys.argv[2], sys.argv[2:])
"""


def _launcher() -> list[str]:
    """What p2pd's command line starts with (on Linux): a Python that puts itself in a process group of
    its own, asks the kernel to kill it when the thread that started it (the DHT's) ends, and becomes
    p2pd (``exec``: no process stays behind it). The signal survives ``exec``; the check of the parent
    covers a parent gone before it was asked for."""
    if sys.platform != "linux":
        return []
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER_CODE, str(os.getpid())]


def _daemon(flags: dict) -> type[P2P]:
    """hivemind's ``P2P`` whose p2pd command line goes through ``_launcher`` and ends with ``flags``
    (``P2P.create`` has no parameter for the relay service's limits): a class per node, so that no other
    node in this process is touched."""
    launcher = _launcher()

    class _Daemon(P2P):
        @staticmethod
        def _make_process_args(*args: Any, **kwargs: Any) -> list[str]:
            return [*launcher, *P2P._make_process_args(*args, **kwargs, **flags)]

    return _Daemon


def _pass_daemon_flags(flags: dict) -> None:
    """Add ``flags`` to the command line of the p2pd this process starts: ``P2P.create`` has no
    parameter for the relay service's limits. (p2pd also starts a second relay service with
    libp2p's defaults: see ``net.relay`` for which one answers.) Process-wide: only for the DHT child
    process, which starts one node."""
    make = P2P._make_process_args
    P2P._make_process_args = staticmethod(lambda *args, **kwargs: make(*args, **kwargs, **flags))


def _kill_own_group(*_: object) -> None:
    os.killpg(0, signal.SIGKILL)


def _watch_parent(parent_pid: int, period: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(period)
    _kill_own_group()


class SwarmDHT:
    """One process's view of a run in the DHT: publish and read the manifest and peer records."""

    def __init__(self, dht: hivemind.DHT, run_id: str, signer: RSASignatureValidator):
        self.dht = dht
        self.run_id = run_id
        self._signer = signer
        self._last_expiration: dict[int, float] = {}
        self.circuit_maddrs: list[str] = []  # this node's addresses through its relay (``net.relay``)
        self.relayed: dict[str, list[str]] = {}  # peer id -> its relayed addresses, as its records said
        # a keyed run's member (``net.auth.RunAuth``): this node's access token, put into the trainer
        # and telemetry records it writes, which the run's validator refuses without one
        self.access_token: Callable[[], str] | None = None

    @classmethod
    def create(
        cls,
        run_id: str,
        *,
        initial_peers: Sequence[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        announce_host: str | None = None,
        identity_path: Path | None = None,
        client_mode: bool = False,
        signer_key: RSAPrivateKey | None = None,
        relay: bool = False,
        relay_limits: tuple[int, int, int] = (128, 16, 4 << 30),
        in_process: bool = True,
    ) -> "SwarmDHT":
        """Start a DHT node (its p2pd, served on a thread of this process) for ``run_id``; blocks until it
        is up. ``in_process=False``: in hivemind's child process instead (``network.dht_process``).
        ``signer_key`` signs its records (a bootstrap passes its persistent authority key). ``relay``:
        serve relay slots to peers behind NAT (the daemon starts its relay service only once it counts
        itself publicly reachable, which it is told here rather than left to guess);
        ``relay_limits``: (slots, relayed connections per peer, bytes a relayed connection carries each way)."""
        # a key of its own per node (not hivemind's process-wide one), so that several nodes in one
        # process, as in tests, cannot sign each other's records either
        signer = RSASignatureValidator(signer_key or RSAPrivateKey())
        kwargs: dict = dict(
            initial_peers=list(initial_peers),
            host_maddrs=[f"/ip4/{host}/tcp/{port}"],
            client_mode=client_mode,
            record_validators=[signer, RunSchemaValidator(run_id)],
            start=True,
            # p2pd's -autonat also turns on hole punching (DCUtR); nodes that relay nothing
            # (trainers, clients) go without (docs/design.md, issue 25)
            auto_nat=relay,
        )
        if relay:  # not forced public: see net.relay (the relay with these limits must start last)
            slots, circuits, data = relay_limits
            kwargs["relay_flags"] = dict(relayMaxReservations=slots, relayMaxCircuits=circuits, relayDataLimit=data,
                                         relayTimeLimit="24h")
        if announce_host:
            kwargs["announce_maddrs"] = [f"/ip4/{announce_host}/tcp/{port}"]
        if identity_path is not None:
            kwargs["identity_path"] = str(identity_path)
        for peer in initial_peers:
            check_multiaddr(peer)
        try:
            if in_process:
                dht = _DHTThread(**kwargs)
            else:
                _freeze_heap()
                dht = _DHTProcess(**kwargs)
        except Exception as e:  # a port in use, an unreachable initial peer, a daemon that won't start
            where = f"/ip4/{host}/tcp/{port}"
            raise PeerUnavailable(f"cannot start the DHT on {where}: {type(e).__name__}: {e}") from None
        return cls(dht, run_id, signer)

    @classmethod
    def create_client(cls, run_id: str, initial_peers: Sequence[str], *, host: str | None = None,
                      client_mode: bool = True) -> "SwarmDHT":
        """A node that serves no stage (trainers, ``swarm status``). Its p2p daemon listens on loopback
        when every initial peer is on loopback (a local swarm, tests), else on all interfaces.
        Trainers pass ``client_mode=False``: averaging their local parts with other trainers needs
        peers that accept connections (hivemind's averager will not group client-mode peers alone)."""
        if host is None:
            host = "127.0.0.1" if all(p.startswith("/ip4/127.") for p in initial_peers) else "0.0.0.0"
        return cls.create(run_id, initial_peers=initial_peers, host=host, client_mode=client_mode)

    @property
    def peer_id(self) -> str:
        return self.dht.peer_id.to_base58()

    def visible_maddrs(self) -> list[str]:
        """The direct addresses of this node, then those through the relay holding its slot, if any."""
        return [str(addr) for addr in self.dht.get_visible_maddrs()] + self.circuit_maddrs

    def note_addresses(self, records: Sequence[PeerRecord]) -> None:
        """Remember the relayed addresses of peers read from the DHT: a caller's daemon cannot find
        them on its own (the relay learns only the direct, undialable ones), so ``P2PTransport``
        dials them first."""
        for record in records:
            relayed = [a for a in record.maddrs if "/p2p-circuit" in a]
            if relayed:
                self.relayed[record.peer_id] = relayed
            else:
                self.relayed.pop(record.peer_id, None)

    def _subkey(self) -> bytes:
        return self.peer_id.encode() + self._signer.local_public_key

    async def publish_manifest(self, manifest: Manifest, ttl: float = MANIFEST_TTL) -> bool:
        return await self.dht.store(
            manifest_key(self.run_id),
            manifest.model_dump(mode="json"),
            expiration_time=get_dht_time() + ttl,
            subkey=self._subkey(),
            return_future=True,
        )

    async def get_manifest(self) -> Manifest | None:
        """The newest valid manifest of the run, or None if no bootstrap has published one."""
        found = await self.dht.get(manifest_key(self.run_id), latest=True, return_future=True)
        newest: tuple[float, Manifest] | None = None
        for entry in _entries(found):
            try:
                manifest = Manifest.model_validate(entry.value)
            except ValidationError as e:
                logger.warning("ignoring a malformed manifest in the DHT: %s", e.errors()[0]["msg"])
                continue
            if newest is None or entry.expiration_time > newest[0]:
                newest = (entry.expiration_time, manifest)
        return None if newest is None else newest[1]

    async def wait_manifest(self, timeout: float) -> Manifest:
        """Poll for the run's manifest with backoff, up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            manifest = await self.get_manifest()
            if manifest is not None:
                return manifest
            if time.monotonic() > deadline:
                raise NoRoute(
                    f"no manifest for run {self.run_id!r} in the DHT after {timeout:.0f} s: "
                    "is the bootstrap running, and is the run id right?"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def announce(self, record: PeerRecord, ttl: float = RECORD_TTL) -> bool:
        """Store (or refresh) this peer's signed record for its stage."""
        expiration = max(get_dht_time() + ttl, self._last_expiration.get(record.stage, 0.0) + 1e-3)
        self._last_expiration[record.stage] = expiration
        return await self.dht.store(
            stage_key(self.run_id, record.stage),
            record.model_dump(mode="json"),
            expiration_time=expiration,
            subkey=self._subkey(),
            return_future=True,
        )

    async def withdraw(self, record: PeerRecord) -> bool:
        """Mark this peer offline for its stage (a DHT record cannot be deleted, only superseded)."""
        offline = record.model_copy(update={"state": PeerState.OFFLINE})
        return await self.announce(offline, ttl=5.0)

    async def stage_records(self, stage: StageIndex) -> list[PeerRecord]:
        """Valid, unexpired records of peers announced for ``stage`` (any state)."""
        found = await self.dht.get(stage_key(self.run_id, stage), latest=True, return_future=True)
        records = []
        for entry in _entries(found):
            try:
                record = PeerRecord.model_validate(entry.value)
            except ValidationError:
                continue  # the schema validator already refuses these; a stale node may still hold one
            if record.stage == stage:
                records.append(record)
        self.note_addresses(records)
        return records

    async def announce_trainer(self, record: TrainerRecord, ttl: float = RECORD_TTL) -> bool:
        """Store (or refresh) this trainer's progress record."""
        expiration = max(get_dht_time() + ttl, self._last_expiration.get(-1, 0.0) + 1e-3)
        self._last_expiration[-1] = expiration
        record = self._with_token(record)
        return await self.dht.store(trainers_key(self.run_id), record.model_dump(mode="json"),
                                    expiration_time=expiration, subkey=self._subkey(), return_future=True)

    async def trainer_records(self) -> list[TrainerRecord]:
        """Valid, unexpired records of the run's trainers (online or not)."""
        return await self._valid(trainers_key(self.run_id), TrainerRecord)

    async def all_records(self, num_stages: int) -> dict[int, list[PeerRecord]]:
        return {stage: await self.stage_records(stage) for stage in range(num_stages)}

    async def announce_store(self, record: StoreRecord, ttl: float = STORE_TTL) -> bool:
        """Store (or refresh) this node's signed record as a checkpoint store of the run."""
        return await self.dht.store(
            store_key(self.run_id), record.model_dump(mode="json"), expiration_time=get_dht_time() + ttl,
            subkey=self._subkey(), return_future=True,
        )

    async def stores(self) -> list[StoreRecord]:
        """The run's live checkpoint stores (usually the bootstrap alone)."""
        return await self._valid(store_key(self.run_id), StoreRecord)

    async def publish_data(self, record: DataRecord, ttl: float = RECORD_TTL) -> bool:
        """Store (or refresh) this node's signed ``DataRecord`` (the bootstrap that leases data shards)."""
        return await self.dht.store(data_key(self.run_id), record.model_dump(mode="json"),
                                    expiration_time=get_dht_time() + ttl, subkey=self._subkey(), return_future=True)

    async def data_records(self) -> list[DataRecord]:
        """The run's live data records, newest first (usually the bootstrap's alone)."""
        return sorted(await self._valid(data_key(self.run_id), DataRecord), key=lambda r: -r.updated)

    @property
    def signing_key(self) -> RSAPrivateKey:
        """This node's RSA key, the one that signs its DHT records (and its contribution ledger)."""
        return self._signer._private_key

    async def publish_telemetry(self, record: MetricsRecord, ttl: float = RECORD_TTL) -> bool:
        """Store (or refresh) this node's signed ``MetricsRecord`` under ``{run}_telemetry``."""
        expiration = max(get_dht_time() + ttl, self._last_expiration.get(-1, 0.0) + 1e-3)
        self._last_expiration[-1] = expiration
        record = self._with_token(record)
        return await self.dht.store(
            telemetry_key(self.run_id),
            record.model_dump(mode="json"),
            expiration_time=expiration,
            subkey=self._subkey(),
            return_future=True,
        )

    def _with_token(self, record: T) -> T:
        if self.access_token is None or record.access_token is not None:
            return record
        return record.model_copy(update={"access_token": self.access_token()})

    async def telemetry_records(self) -> list[MetricsRecord]:
        """Valid, unexpired metrics records of the run's trainers and peers."""
        return await self._valid(telemetry_key(self.run_id), MetricsRecord)

    async def _valid(self, key: str, model: type[R]) -> list[R]:
        """The unexpired entries under ``key`` that parse as ``model``; one that does not was refused on
        store by the schema validator, but a stale node may still hold one."""
        found = await self.dht.get(key, latest=True, return_future=True)
        records = []
        for entry in _entries(found):
            try:
                records.append(model.model_validate(entry.value))
            except ValidationError:
                continue
        return records

    def shutdown(self) -> None:
        """Stop the DHT node (its thread or child process) and its p2pd. Idempotent (a node whose p2pd
        died is no longer alive, but its thread is still stopped)."""
        self.dht.shutdown()


def _entries(found) -> list:
    """The subkey entries of a ``dht.get`` result (``ValueWithExpiration`` of a dict), or []."""
    if found is None or not isinstance(found.value, dict):
        return []
    now = get_dht_time()
    return [entry for entry in found.value.values() if entry.expiration_time > now]
