"""A keyed run probed as an outsider probes it (issue 22), over real hivemind on loopback.

A keyed bootstrap, a mirror of it, two peers (one a delegate) and a stranger with a libp2p identity
of its own but no key. The census lists every handler every node registered with its p2p daemon and
checks that the stranger gets ``AuthRejected`` from each, having sent only a frame header that
announces 8 MiB and 1 KiB of it: the gate answers before the body is read. The rows of the issue's
probe table follow, each as a test that the probe now fails.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import closing

import hivemind
import psutil
import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from bootstrap.node import BootstrapNode
from dht.schemas import BanReport, DatasetSpec
from dht.bans import report_ban
from dht.records import SwarmDHT
from dht.schemas import MetricsRecord, StoreRecord, TrainerRecord
from peers.accounting.ledger import LEDGER_SUBMIT
from peers.data.client import DataClient, find_data_service
from peers.joining.measure import ECHO
from peers.training.protocol import FORWARD, INFO, InfoRequest
from peers.state.store_client import StoreClient
from peers.state.store_protocol import CHECKPOINT_GET, CHECKPOINT_PUT, PutRequest
from net.transport import P2PTransport, _frames
from core.config import load_settings
from tests.fuzzing import read_reply
from tests.helpers import LocalSwarm
from swarm.assigned import AssignedBatches
from swarm.text import ByteCodec
from net.rpc import Raw

pytestmark = pytest.mark.slow

# the only handlers a caller without a token may use, and why
PUBLIC = {
    "swarm.auth.present": "how a caller shows its token: it cannot need one",
    "swarm.auth.token": "how a node trades its API key for a token (the key is checked inside)",
}
ANNOUNCED = 8 << 20  # the frame the census announces; it sends 1 KiB of it
REPLY_WITHIN = 5.0


class _Stranger:
    """A DHT node and a transport of their own, with no key."""

    def __init__(self, swarm: LocalSwarm):
        self.swarm = swarm
        self.dht = hivemind.DHT(initial_peers=swarm.initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        self.transport: P2PTransport = swarm.loop.run(self._transport(), timeout=60)

    async def _transport(self) -> P2PTransport:
        return P2PTransport(await self.dht.replicate_p2p())

    def call(self, peer_id: str, method: str, message, tensors=()) -> dict:
        reply, _ = self.swarm.loop.run(self.transport.call(peer_id, method, Raw(message), list(tensors), timeout=30),
                                       timeout=40)
        return reply

    def header_only(self, peer_id: str, method: str) -> tuple[object, float]:
        """The reply to a stream that announces an ``ANNOUNCED``-byte frame and sends 1 KiB of it,
        and how long it took (None if none came within ``REPLY_WITHIN``)."""
        return self.swarm.loop.run(self._header_only(peer_id, method), timeout=REPLY_WITHIN + 30)

    async def _header_only(self, peer_id: str, method: str):
        started = time.monotonic()
        _, reader, writer = await self.transport.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), method)
        with closing(writer):
            writer.write(P2P.MESSAGE_MARKER + ANNOUNCED.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + bytes(1024))
            await writer.drain()
            reply = await read_reply(reader, REPLY_WITHIN)
        return reply, time.monotonic() - started

    def stop(self) -> None:
        self.swarm.loop.run(self.transport.p2p.shutdown(), timeout=30)
        self.dht.shutdown()


class _Run:
    def __init__(self, swarm: LocalSwarm, mirror: BootstrapNode, key: str):
        self.swarm, self.mirror, self.key = swarm, mirror, key
        self.stranger = _Stranger(swarm)

    def nodes(self) -> dict[str, list[P2P]]:
        """Every node of the run and the p2p handles its handlers are registered on."""
        found: dict[str, list[P2P]] = {}
        for node in (self.swarm.bootstrap, self.mirror):
            found[node.dht.peer_id] = [node._transport.p2p, node.checkpoints._transport.p2p,
                                       node.telemetry._transport.p2p]
        for peer in self.swarm.peers:
            found[peer.peer_id] = [peer._transport.p2p, peer._auth.transport.p2p]
        return found

    def registered(self) -> dict[tuple[str, str], str]:
        """``(node, method) -> kind`` for every stream and unary handler registered with p2pd."""
        out = {}
        for node, handles in self.nodes().items():
            for p2p in handles:
                control = p2p._client.control
                out |= {(node, method): "stream" for method in control.handlers}
                out |= {(node, method): "unary" for method in control.unary_handlers}
        return out


@pytest.fixture(scope="module")
def run(model_factory, tmp_path_factory):
    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4)
    state = tmp_path_factory.mktemp("closed")
    swarm = LocalSwarm(model_dir, state_dir=state, num_stages=2, num_peers=0, open=False, target_batch_size=2)
    swarm.start()
    mirror = None
    target = None
    try:
        key = swarm.bootstrap.db.create_key("volunteers", actor="test").secret
        swarm.add_peer(stage=0, key=key, delegation={"accept": True, "tokens": ["t"]})
        swarm.accept_delegations(swarm.peers[0])
        swarm.add_peer(stage=1, key=key)
        settings = load_settings(run_id="test", state_dir=state / "mirror", network={"host": "127.0.0.1"},
                                 bootstrap={"mirror": swarm.bootstrap.maddrs[0], "dashboard_port": 0,
                                            "dashboard": False, "sync_interval": 1.0,
                                            "authority_key": swarm.bootstrap.state_dir / "authority.key"})
        mirror = BootstrapNode(settings)
        swarm.loop.run(mirror.start(), timeout=90)
        target = _Run(swarm, mirror, key)
        yield target
    finally:
        if target is not None:
            target.stranger.stop()
        if mirror is not None:
            swarm.loop.run(mirror.stop(), timeout=60)
        swarm.stop()


def test_every_handler_refuses_a_caller_without_a_token_before_reading_its_body(run):
    registered = run.registered()
    methods = {method for _, method in registered}
    # the census covers what the issue names: peers, delegation, and each bootstrap's services
    for wanted in ("swarm.stage.forward", "swarm.delegation.start", "swarm.checkpoint.put", "swarm.ledger.submit",
                   "swarm.bootstrap.sync", "swarm.probe.echo", "swarm.stage.push", "swarm.data.lease",
                   "swarm.data.renew", "swarm.data.eval"):
        assert wanted in methods, f"{wanted} is not served anywhere: the census would miss it"
    assert all(kind == "stream" for kind in registered.values()), "a unary handler bypasses the transport's gate"
    open_to_all = []
    for (node, method) in sorted(registered):
        reply, took = run.stranger.header_only(node, method)
        if method in PUBLIC:
            continue
        if not (isinstance(reply, dict) and reply.get("error", {}).get("code") == "AuthRejected"):
            open_to_all.append(f"{method} on {node[-8:]}: {reply!r}")
        else:
            assert took < REPLY_WITHIN, (method, took)
    assert not open_to_all, "handlers open to a caller without a token:\n" + "\n".join(open_to_all)


@pytest.mark.parametrize("method, target", [
    (CHECKPOINT_GET, "bootstrap"), (CHECKPOINT_PUT, "bootstrap"), (LEDGER_SUBMIT, "bootstrap"),
    (ECHO, "peer"), (FORWARD, "peer"),
])
def test_the_probes_without_a_key_are_refused(run, method, target):
    """The issue's rows: ``checkpoint.get`` returned stage 0's weights, ``checkpoint.put`` stored a
    poisoned step 10^9, ``ledger.submit`` credited an outsider, ``probe.echo`` answered."""
    node = run.swarm.bootstrap.dht.peer_id if target == "bootstrap" else run.swarm.peers[0].peer_id
    messages = {CHECKPOINT_GET: {"part": "stage-0"}, CHECKPOINT_PUT: {"meta": {}, "names": ["param/x"]},
                LEDGER_SUBMIT: {"entries": []}, ECHO: {}, FORWARD: {}}
    reply = run.stranger.call(node, method, messages[method], [torch.full((4,), 1e4)])
    assert reply.get("error", {}).get("code") == "AuthRejected", reply
    assert "ok" not in reply


def test_a_flood_of_large_requests_without_a_key_does_not_grow_the_peer(run):
    """40 concurrent 25 MiB stage calls without a key: refused from their first bytes, so this process
    (which hosts the peers) does not buffer the gigabyte (it grew by 1.5 GiB before issue 22)."""
    peer = run.swarm.peers[1]
    rss = psutil.Process().memory_info().rss
    frames = _frames({"stage": 1}, [torch.zeros(6 << 20 >> 2)], runtime_pb2.ExpertRequest)  # 24 MiB
    request = b"".join(P2P.MESSAGE_MARKER + len(data).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + data
                       for data in (frame.SerializeToString() for frame in frames))

    async def flood_one() -> object:
        _, reader, writer = await run.stranger.transport.p2p.call_binary_stream_handler(
            PeerID.from_base58(peer.peer_id), FORWARD)
        with closing(writer):
            try:
                for start in range(0, len(request), 1 << 20):
                    writer.write(request[start:start + (1 << 20)])
                    await writer.drain()
            except (ConnectionError, OSError):
                pass  # the peer stopped reading after refusing: that is the point
            return await read_reply(reader, 10.0)

    async def flood() -> list:
        return await asyncio.gather(*(flood_one() for _ in range(40)), return_exceptions=True)

    started = time.monotonic()
    replies = run.swarm.loop.run(flood(), timeout=120)
    took = time.monotonic() - started
    grown = (psutil.Process().memory_info().rss - rss) >> 20
    # each is refused (the reply may be lost: the peer resets a stream it stops reading)
    for reply in replies:
        assert isinstance(reply, (ConnectionError, OSError)) or reply is None or (
            reply.get("error", {}).get("code") in ("AuthRejected", "CapacityExceeded")), reply
    assert grown < 150, f"the process grew by {grown} MiB under the flood"
    assert took < 60
    # and it still serves the run's members
    member = run.swarm.peers[0]
    reply, _ = run.swarm.loop.run(member._replica_transport().call(
        peer.peer_id, INFO, InfoRequest(stage=1), [], timeout=30), timeout=40)
    assert "ok" in reply, reply


def test_a_key_holder_may_not_put_a_checkpoint_of_a_stage_it_does_not_serve_nor_one_ahead_of_the_run(run):
    """Issue 22's critical row, by a run member: only the stage's own peer may put, and not step 10^9
    nor parameters at 1e4 (the store then skipped honest uploads for good)."""
    store = StoreClient(run.swarm.peers[1]._replica_transport(), run.swarm.peers[1].dht.stores, attempts=1)
    owner = run.swarm.peers[0]
    meta, tensors = run.swarm.loop.run(owner._in_compute(_capture, owner.slots[0].service.executor, owner.host.identity),
                                       timeout=60)

    def put(client: StoreClient, meta, tensors) -> dict:
        request = PutRequest(meta=meta, names=list(tensors))
        stores = run.swarm.loop.run(client.store_ids(), timeout=30)
        reply, _ = run.swarm.loop.run(client.transport.call(stores[0], CHECKPOINT_PUT, request, list(tensors.values()),
                                                            timeout=60), timeout=70)
        return reply

    assert put(store, meta, tensors)["error"]["code"] == "AuthRejected"  # peer 1 serves stage 1, not 0
    own = StoreClient(owner._replica_transport(), owner.dht.stores, attempts=1)
    ahead = put(own, meta.model_copy(update={"step": 10**9}), tensors)
    assert ahead["error"]["code"] == "BadRequest" and "claims step 1000000000" in ahead["error"]["message"]
    poisoned = {k: (torch.full_like(t, 1e4) if k.startswith("param/") else t) for k, t in tensors.items()}
    assert put(own, meta, poisoned)["error"]["code"] == "BadRequest"
    assert run.swarm.bootstrap.checkpoints.latest_step("stage-0") in (None, meta.step)


def _capture(executor, identity):
    from peers.state.snapshot import capture_state

    return capture_state(executor.module, executor.optimizer, identity=identity, step=executor.optimizer_step,
                         stage=executor.stage, layers=executor.layers)


def test_records_without_a_key_or_naming_another_peer_are_refused(run):
    """Issue 22's rows: a key holder announced a stage record with another peer's ``peer_id`` (stored
    beside the real one); anyone stored trainer, telemetry and checkpoint-store records without a key."""
    victim, holder = run.swarm.peers
    forged = holder.record.model_copy(update={"peer_id": victim.peer_id, "stage": 1})
    stranger = SwarmDHT.create("test", initial_peers=run.swarm.initial_peers, host="127.0.0.1")
    try:
        async def stores() -> tuple:
            impersonation = await holder.dht.announce(forged)
            trainer = await stranger.announce_trainer(TrainerRecord(trainer_id=stranger.peer_id, step=10**6))
            telemetry = await stranger.publish_telemetry(MetricsRecord(role="peer", peer_id=stranger.peer_id,
                                                                       tokens=10**12))
            store = await stranger.announce_store(StoreRecord(peer_id=stranger.peer_id))
            seen = (await victim.dht.stage_records(1), await victim.dht.trainer_records(),
                    await victim.dht.telemetry_records(), await victim.dht.stores())
            return (impersonation, trainer, telemetry, store), seen

        stored, (stage1, trainers, telemetry, store_records) = run.swarm.loop.run(stores(), timeout=60)
    finally:
        stranger.shutdown()
    # a store may report True: the stranger's own node (no validator of the run) may be among the
    # key's nearest and keep it. What counts is that the run's nodes neither keep nor serve it back:
    # every lookup validates what it finds.
    assert len(stored) == 4
    assert [r.peer_id for r in stage1] == [holder.peer_id]
    assert stranger.peer_id not in {t.trainer_id for t in trainers}
    assert stranger.peer_id not in {t.peer_id for t in telemetry}
    assert stranger.peer_id not in {s.peer_id for s in store_records}


def test_a_ban_report_naming_another_reporter_is_refused(run):
    """Issue 22's critical row: a key holder published a ``BanReport`` against an honest peer naming
    another honest peer as reporter; the bootstrap revoked the victim's key within 1.5 s and the
    audit blamed the named peer. The report must name its signer."""
    victim, holder = run.swarm.peers
    framed = run.mirror.dht.peer_id
    report = BanReport(peer_id=victim.peer_id, stage=0, reason="forged", reporter=framed,
                       access_token=holder._auth.token)
    bootstrap = run.swarm.bootstrap

    async def forge() -> list[str]:
        await report_ban(holder.dht, report)
        await asyncio.sleep(1.5)
        return await bootstrap.bans.check_once()

    assert victim.peer_id not in run.swarm.loop.run(forge(), timeout=60)
    assert victim.peer_id not in bootstrap.bans.handled and victim.peer_id not in bootstrap.telemetry.book.banned
    assert all(k.revoked is None for k in bootstrap.db.list_keys())
    assert not any(e.actor == f"ban:{framed}" for e in bootstrap.db.audit_log(1000))


def test_a_trainer_of_the_run_uploads_its_local_parts_through_the_gate(run):
    """The store is gated now: a trainer's upload presents its token, and is kept (it trains)."""
    batch = torch.randint(0, 64, (2, 8))
    model = run.swarm.client(key=run.key)
    try:
        model(batch, labels=batch).loss.backward()
        assert model.upload_local_state(1) == 2  # the bootstrap and its mirror both keep checkpoints
    finally:
        model.close()
    assert run.swarm.bootstrap.checkpoints.latest_step("local") == 1


def test_a_trainer_of_the_run_leases_a_data_shard_through_the_gate_and_a_mirror_leases_none(run, tmp_path):
    """The lease RPCs are gated like the rest (the census above); a trainer's token opens them, its
    peer id holds the lease, and only the primary keeps leases (a mirror's book would be a second one)."""
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(f'{{"text": "text number {i}"}}\n' for i in range(8)))
    spec = DatasetSpec(source=str(data), num_shards=2)
    model = run.swarm.client(key=run.key)
    try:
        client = DataClient(model.pipeline.client.transport, lambda: find_data_service(model.dht))
        with AssignedBatches(client, spec, ByteCodec(), batch_size=2, seq_len=8, run=model.loop.run,
                             submit=model.submit) as batches:
            assert next(batches).shape == (2, 8)
            batches.commit(model.step)
            holder = run.swarm.bootstrap.data.book.rows(spec.dataset_id)[0].holder
        assert holder == model.dht.peer_id
    finally:
        model.close()
    assert run.mirror.data is None
    [row] = run.swarm.bootstrap.data.book.rows(spec.dataset_id)
    assert (row.shard, row.holder, row.tokens) == (0, None, 16)
