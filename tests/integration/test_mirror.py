"""Two bootstraps for one keyed run (a primary and a ``--mirror``), over real hivemind on loopback
with real state.db files: keys made or revoked on either take effect through the other within 60 s,
the mirror serves joins and its dashboard, a new peer joins through a running peer's address while
the primary is down (token from the mirror), a restarted primary catches up, and with every
bootstrap down a new peer is refused with an error that says why. Bad mirror input fails clearly."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from bootstrap.mirror import sync_with
from bootstrap.node import BootstrapNode
from bootstrap.state import StateDB
from dht.auth import issue_token, verify_token
from net.auth import AuthedTransport
from dht.records import SwarmDHT
from net.transport import P2PTransport
from dht.schemas import BootstrapRecord, RunState
from dht.control import get_bootstraps, get_control, publish_bootstrap
from core.config import load_settings
from core.errors import AuthRejected, ConfigError, PeerUnavailable

pytestmark = pytest.mark.slow

SYNC = 1.0


def _mirror_settings(state_dir: Path, mirror: str, authority_key: Path | None):
    return load_settings(run_id="test", state_dir=state_dir, network={"host": "127.0.0.1"},
                         bootstrap={"mirror": mirror, "authority_key": authority_key, "dashboard_port": 0,
                                    "sync_interval": SYNC})


def _wait_for(what: str, check, timeout: float = 60.0) -> float:
    """Poll ``check()`` until true; the seconds it took (fails the test after ``timeout``)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.2)
    return time.monotonic() - start


def _audited(db, action: str, actor: str) -> bool:
    return any(e.action == action and e.actor == actor for e in db.audit_log(1000))


def test_bad_mirror_input_is_named(model_factory, swarm_factory, tmp_path: Path):
    swarm = swarm_factory(model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4), num_stages=2,
                          num_peers=0, open=False)
    primary = swarm.bootstrap.maddrs[0]
    with pytest.raises(ConfigError, match="a mirror needs the run's authority key"):
        swarm.loop.run(BootstrapNode(_mirror_settings(tmp_path / "m1", primary, None)).__aenter__(), timeout=60)
    with pytest.raises(ConfigError, match="no such file"):
        swarm.loop.run(BootstrapNode(_mirror_settings(tmp_path / "m2", primary, tmp_path / "nope.key")).__aenter__())
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(RSAPrivateKey().to_bytes())
    with pytest.raises(ConfigError, match="authority key does not match run 'test'"):
        swarm.loop.run(BootstrapNode(_mirror_settings(tmp_path / "m3", primary, wrong)).__aenter__(), timeout=60)
    (tmp_path / "garbage.key").write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="garbage.key is not an RSA private key"):
        swarm.loop.run(BootstrapNode(_mirror_settings(tmp_path / "m4", primary, tmp_path / "garbage.key")).__aenter__())
    with pytest.raises(ConfigError, match="'/ip4/127.0.0.1/tcp/9' lacks the peer id"):
        swarm.loop.run(BootstrapNode(_mirror_settings(tmp_path / "m5", "/ip4/127.0.0.1/tcp/9",
                                                      swarm.bootstrap.state_dir / "authority.key")).__aenter__())
    # a node without the authority key cannot sync (refused and audited; nothing of its state taken in)
    stranger, own = SwarmDHT.create("test", initial_peers=swarm.initial_peers, host="127.0.0.1"), StateDB(tmp_path / "x.db")
    try:
        own.create_key("intruder", actor="test")

        async def try_sync(authority: RSAPrivateKey, own_peer_id: str, *, present: bool = True) -> None:
            """Sync as the stranger; ``present``: first present a token it signs with ``authority``
            (only a holder of the run's authority key can sign one the bootstrap's gate accepts)."""
            transport = P2PTransport(await stranger.dht.replicate_p2p())
            public_key = stranger._signer.local_public_key[len(b"[owner:"):-1]
            token = issue_token(authority, "bootstrap", stranger.peer_id, public_key, get_dht_time() + 600)
            calls = AuthedTransport(transport, lambda: token) if present else transport
            try:
                await sync_with(calls, own, authority, run_id="test", own_peer_id=own_peer_id,
                                peer_id=swarm.bootstrap.dht.peer_id)
            finally:
                await transport.p2p.shutdown()

        # the gate refuses before the sync's own signature is even read
        with pytest.raises(AuthRejected, match="present an access token first"):
            swarm.loop.run(try_sync(swarm.bootstrap.authority, stranger.peer_id, present=False))
        with pytest.raises(AuthRejected, match="not signed by this run's bootstrap"):
            swarm.loop.run(try_sync(RSAPrivateKey(), stranger.peer_id))
        with pytest.raises(AuthRejected, match="but sent by"):  # the right key, but posing as another sender
            swarm.loop.run(try_sync(swarm.bootstrap.authority, swarm.bootstrap.dht.peer_id))
    finally:
        own.close()
        stranger.shutdown()
    assert swarm.bootstrap.db.list_keys() == []
    assert sum(e.action == "sync.rejected" and e.actor == stranger.peer_id
               for e in swarm.bootstrap.db.audit_log()) == 1  # audited at most once a minute per caller

    dead = f"/ip4/127.0.0.1/tcp/9/p2p/{swarm.bootstrap.dht.peer_id}"  # a port nothing listens on
    with pytest.raises(PeerUnavailable, match=f"cannot reach the bootstrap to mirror at {dead}"):
        swarm.loop.run(BootstrapNode(_mirror_settings(tmp_path / "m6", dead, swarm.bootstrap.state_dir / "authority.key"))
                       .__aenter__(), timeout=60)


def test_primary_and_mirror_share_keys_and_joins(model_factory, swarm_factory, tmp_path: Path):
    swarm = swarm_factory(model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4), num_stages=2,
                          num_peers=0, target_batch_size=2, open=False, sync_interval=SYNC)
    primary = swarm.bootstrap
    early = primary.db.create_key("early", actor="test", expires_in=3600)
    researcher = primary.db.create_key("researcher", actor="test")
    mirror = BootstrapNode(_mirror_settings(tmp_path / "mirror", primary.maddrs[0], primary.state_dir / "authority.key"))
    swarm.loop.run(mirror.__aenter__(), timeout=120)  # stops what it started if it fails
    model = None
    try:
        # caught up at start: the same key rows (hashes included), and it requires keys like the run
        assert mirror.keys_required and mirror.manifest == primary.manifest
        assert mirror.db.key_rows() == primary.db.key_rows()
        records = swarm.loop.run(get_bootstraps(primary.dht))
        assert {(r.peer_id, r.role) for r, _ in records} == {(primary.dht.peer_id, "primary"),
                                                               (mirror.dht.peer_id, "mirror")}

        # a key made on the primary lets a peer join through the mirror within 60 s
        late = primary.db.create_key("late", actor="test")
        synced = _wait_for("the new key reaching the mirror", lambda: mirror.db.key_usable(late.key.id))
        print(f"key created on the primary usable on the mirror after {synced:.1f} s")
        p0 = swarm.add_peer(stage=0, key=late.secret, initial_peers=mirror.maddrs)
        claims = verify_token(p0.record.access_token, primary.authority.get_public_key())
        assert (claims.key_id, claims.peer_id) == (late.key.id, p0.peer_id)
        assert _audited(mirror.db, "peer.auth", p0.peer_id)  # the mirror it was pointed at issued the token
        assert _audited(mirror.db, "sync.key.create", f"sync:{primary.dht.peer_id}")
        p1 = swarm.add_peer(stage=1, key=early.secret)
        # a peer cannot announce itself as a bootstrap: the record is not signed by the authority
        forged = BootstrapRecord(peer_id=p1.peer_id, maddrs=p1.record.maddrs, role="mirror", updated=get_dht_time() + 60)
        assert swarm.loop.run(publish_bootstrap(p1.dht, forged)) is False
        assert p1.peer_id not in {r.peer_id for r, _ in swarm.loop.run(get_bootstraps(p0.dht))}

        # the mirror's dashboard answers /api/status with the run and its peers
        with urllib.request.urlopen(f"{mirror.dashboard.url}/api/status", timeout=30) as reply:
            status = json.loads(reply.read())
        assert status["run_id"] == "test" and {p0.peer_id, p1.peer_id} <= {p["peer_id"] for p in status["peers"]}

        # pause on the mirror, resume on the primary: both reach the other side and the swarm
        mirror.db.set_run_state("paused", actor="test")
        _wait_for("the pause reaching the primary and the peers", lambda: primary.db.run_state() == "paused"
                  and swarm.loop.run(get_control(p0.dht)).state == RunState.PAUSED)
        primary.db.set_run_state("running", actor="test")
        _wait_for("the resume reaching the mirror and the peers", lambda: mirror.db.run_state() == "running"
                  and swarm.loop.run(get_control(p1.dht)).state == RunState.RUNNING)
        assert _audited(primary.db, "sync.run.paused", f"sync:{mirror.dht.peer_id}")
        assert _audited(mirror.db, "sync.run.running", f"sync:{primary.dht.peer_id}")

        # a peer the owner bans on the primary is banned on the mirror too, and the run-control
        # record both publish keeps it (before, the mirror's own record, without it, could replace it)
        outcast = "QmOutcastPeerBannedByTheOwner000000000000000"
        assert "banned" in swarm.loop.run(primary.ban_peer(outcast, actor="test"))
        _wait_for("the ban reaching the mirror", lambda: outcast in mirror.db.banned_peers()
                  and all(b.control is not None and outcast in b.control.banned for b in (primary, mirror)))
        assert mirror.db.banned_row() == primary.db.banned_row() and mirror.control == primary.control
        assert outcast in swarm.loop.run(get_control(p1.dht)).banned
        assert _audited(mirror.db, "sync.peer.ban", f"sync:{primary.dht.peer_id}")

        # a key revoked on the mirror cuts its holder off, and the primary refuses it too
        model = swarm.client(key=researcher.secret)
        batch = torch.randint(0, 64, (2, 8))
        assert torch.isfinite(model(batch, labels=batch).loss)
        revoked_at = time.monotonic()
        mirror.db.revoke_key(researcher.key.id, actor="test")

        def refused() -> bool:
            try:
                model(batch, labels=batch).loss.backward()
            except AuthRejected as e:
                assert "revoked" in str(e)
                return True
            return False

        _wait_for("the revoked trainer being refused", refused)
        print(f"trainer whose key was revoked on the mirror refused after {time.monotonic() - revoked_at:.1f} s")
        _wait_for("the revocation reaching the primary",
                  lambda: next(k for k in primary.db.list_keys() if k.id == researcher.key.id).revoked is not None)
        with pytest.raises(AuthRejected, match=f"API key {researcher.key.id} .* is revoked"):
            swarm.add_peer(stage=0, key=researcher.secret)  # asks the primary first: refused there
        swarm.peers.pop()
        assert _audited(primary.db, "sync.key.revoke", f"sync:{mirror.dht.peer_id}")

        # the primary down: a new peer joins through a running peer's address, its token from the mirror
        swarm.loop.run(primary.stop(), timeout=60)
        after = mirror.db.create_key("after", actor="test")
        p2 = swarm.add_peer(stage=1, key=after.secret, initial_peers=p0.record.maddrs)
        assert verify_token(p2.record.access_token, mirror.authority.get_public_key()).key_id == after.key.id
        assert _audited(mirror.db, "peer.auth", p2.peer_id)

        # the primary restarts and catches up from the mirror before it serves anyone
        swarm.bootstrap = BootstrapNode(primary.settings)
        swarm.loop.run(swarm.bootstrap.start(), timeout=60)
        assert swarm.bootstrap.db.key_rows() == mirror.db.key_rows()
        assert swarm.bootstrap.db.key_usable(after.key.id)

        # every bootstrap down: a new keyed peer is told why it cannot join
        swarm.loop.run(swarm.bootstrap.stop(), timeout=60)
        swarm.loop.run(mirror.stop(), timeout=60)
        with pytest.raises(PeerUnavailable, match="no bootstrap or mirror of run 'test' is reachable to check"):
            swarm.add_peer(stage=0, key=after.secret, initial_peers=p0.record.maddrs)
        swarm.peers.pop()
    finally:
        if model is not None:
            model.close()
        swarm.loop.run(mirror.stop(), timeout=60)
