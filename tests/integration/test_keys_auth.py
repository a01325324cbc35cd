"""Key enforcement over a real swarm: no key or a bad key cannot join; a caller without a token is
refused; forged records (no token, a token from another authority, someone else's subkey) are
refused by the DHT; revoking a trainer's key cuts it off within 60 s."""

from __future__ import annotations

import time

import pytest
import torch
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from dht.auth import issue_token
from dht.records import SwarmDHT
from dht.schemas import PeerRecord, PeerState, stage_key
from peers.training.protocol import INFO, InfoRequest
from net.transport import P2PTransport
from swarm.api import SwarmKeys
from core.errors import AuthRejected

pytestmark = pytest.mark.slow


def test_keys_tokens_forgery_and_revocation(model_factory, swarm_factory):
    swarm = swarm_factory(model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4), num_stages=2,
                          num_peers=0, target_batch_size=2, open=False)
    db = swarm.bootstrap.db
    peer_key = db.create_key("volunteers", actor="test").secret
    trainer_key = db.create_key("researcher", actor="test").secret

    with pytest.raises(AuthRejected, match="needs an API key"):
        swarm.add_peer(stage=0)
    with pytest.raises(AuthRejected, match="unknown API key"):
        swarm.add_peer(stage=0, key=peer_key[:-6] + "AAAAAA")
    swarm.peers.clear()  # both failed and stopped themselves
    peers = [swarm.add_peer(stage=0, key=peer_key), swarm.add_peer(stage=1, key=peer_key)]
    assert all(p.record.access_token for p in peers)

    batch = torch.randint(0, 64, (2, 8))
    model = swarm.client(key=trainer_key)
    try:
        loss = model(batch, labels=batch).loss
        loss.backward()
        assert torch.isfinite(loss)

        stranger = SwarmDHT.create("test", initial_peers=swarm.initial_peers, host="127.0.0.1")
        try:
            async def stranger_calls_and_forges():
                transport = P2PTransport(await stranger.dht.replicate_p2p())
                try:
                    reply, _ = await transport.call(peers[0].peer_id, INFO, InfoRequest(), [], timeout=30)
                finally:
                    await transport.p2p.shutdown()
                layers = swarm.bootstrap.manifest.stages[0]
                fake = PeerRecord(peer_id=stranger.peer_id, stage=0, layers=layers, state=PeerState.ONLINE,
                                  throughput=1e9)
                no_token = await stranger.announce(fake)
                other_authority = issue_token(RSAPrivateKey(), "deadbeef", stranger.peer_id,
                                              stranger._signer.local_public_key[7:-1], get_dht_time() + 600)
                bad_token = await stranger.announce(fake.model_copy(update={"access_token": other_authority}))
                # a valid token of a real peer, copied into the stranger's own record: wrong holder
                stolen = await stranger.announce(fake.model_copy(update={"access_token": peers[0].record.access_token}))
                # the stranger overwrites a real peer's entry under that peer's subkey: bad signature
                overwrite = await stranger.dht.store(stage_key("test", 0), fake.model_dump(mode="json"),
                                                     get_dht_time() + 60, subkey=peers[0].dht._subkey(),
                                                     return_future=True)
                seen = await peers[1].dht.stage_records(0)
                return reply, (no_token, bad_token, stolen, overwrite), seen

            reply, stores, seen = swarm.loop.run(stranger_calls_and_forges())
        finally:
            stranger.shutdown()
        assert reply["error"]["code"] == "AuthRejected" and "present an access token" in reply["error"]["message"]
        assert stores == (False, False, False, False)
        assert [r.peer_id for r in seen] == [peers[0].peer_id]

        revoked_at = time.monotonic()
        db.revoke_key(trainer_key, actor="test")
        cut_off = None
        while time.monotonic() - revoked_at < 60:
            try:
                model(batch, labels=batch).loss.backward()
            except AuthRejected as e:
                cut_off = time.monotonic() - revoked_at
                assert "revoked" in str(e)
                break
            time.sleep(0.5)
        assert cut_off is not None, "the revoked trainer was still served after 60 s"
        print(f"revoked trainer cut off after {cut_off:.1f} s")
        actions = [(e.action, e.actor) for e in db.audit_log()]
        assert ("key.revoke", "test") in actions and sum(a == "peer.auth" for a, _ in actions) == 3
        assert any(a == "auth.rejected" for a, _ in actions)

        # the OpenAI-compatible server of a keyed run checks its clients' keys against the run's: keys
        # of scope api only (a volunteer's join key is refused), each check audited by the bootstrap
        api_keys = SwarmKeys(model.run_auth, model.loop)
        user = db.create_key("api-user", actor="test", scopes=("api",))
        other = db.create_key("api-user 2", actor="test", scopes=("api",))
        assert api_keys.enforced() and api_keys.allows(user.secret)
        assert not api_keys.allows(user.secret[:-6] + "AAAAAA") and not api_keys.allows("sk-not-a-swarm-key")
        assert not api_keys.allows(peer_key.replace(peer_key.split("_")[1], "00000000"))
        assert not api_keys.allows(peer_key)  # a join key cannot use the API
        audit = [(e.action, e.detail) for e in db.audit_log()]
        assert ("api.check", f"key {user.key.id} (api-user)") in audit
        assert any(a == "auth.rejected" and "cannot use the inference API" in d for a, d in audit)
        with pytest.raises(AuthRejected, match="cannot join the run"):  # an inference key cannot join
            swarm.add_peer(stage=1, key=user.secret)
        swarm.peers.pop()  # it failed and stopped itself
        revoked_at = time.monotonic()
        db.revoke_key(user.key.id, actor="test")
        while api_keys.allows(user.secret):
            assert time.monotonic() - revoked_at < 60, "a revoked key still passed the API's check after 60 s"
            time.sleep(0.5)
        assert api_keys.allows(other.secret)  # another key of the run is not affected
    finally:
        model.close()
