"""Access tokens, the record validator and the login limiter as pure logic (no network)."""

from __future__ import annotations

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey

from bootstrap.admin import LoginLimiter
from dht.auth import TokenRecordValidator, issue_token, verify_token
from dht.schemas import bans_key
from dht.schemas import bootstraps_key, control_key, metrics_key
from dht.schemas import manifest_key, stage_key, store_key, telemetry_key, trainers_key
from core.errors import AuthRejected

AUTHORITY = RSAPrivateKey()
HOLDER = RSAPrivateKey()
HOLDER_KEY = HOLDER.get_public_key().to_bytes()
NOW = 1_000_000.0


def _token(authority: RSAPrivateKey = AUTHORITY, key_id: str = "k1", expires: float = NOW + 60) -> str:
    return issue_token(authority, key_id, "peerA", HOLDER_KEY, expires)


@pytest.mark.parametrize("token, revoked, error", [
    (_token(), set(), None),
    (_token(expires=NOW - 1), set(), "expired"),
    (_token(), {"k1"}, "revoked"),
    (_token(authority=RSAPrivateKey()), set(), "not signed by this run's bootstrap"),
    ("not base64!", set(), "malformed"),
    (_token()[:-12] + "AAAAAAAAAAA=", set(), "not signed|malformed"),
])
def test_verify_token_table(token: str, revoked: set[str], error: str | None) -> None:
    authority = AUTHORITY.get_public_key()
    if error is None:
        claims = verify_token(token, authority, now=NOW, revoked=revoked)
        assert (claims.key_id, claims.peer_id, claims.public_key) == ("k1", "peerA", HOLDER_KEY)
    else:
        with pytest.raises(AuthRejected, match=error):
            verify_token(token, authority, now=NOW, revoked=revoked)


def _record(key: str, value: dict, owner: bytes) -> DHTRecord:
    subkey = MSGPackSerializer.dumps(b"peerA" + RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", owner))
    return DHTRecord(DHTID.generate(source=key).to_bytes(), subkey, MSGPackSerializer.dumps(value), 0.0)


def test_record_validator_table() -> None:
    validator = TokenRecordValidator("run", AUTHORITY.get_public_key().to_bytes())
    authority_key = AUTHORITY.get_public_key().to_bytes()
    valid = issue_token(AUTHORITY, "k1", "peerA", HOLDER_KEY, 4e9)
    stage = stage_key("run", 3)
    assert validator.validate(_record(stage, {"peer_id": "peerA", "access_token": valid}, HOLDER_KEY))
    assert not validator.validate(_record(stage, {"peer_id": "peerA"}, HOLDER_KEY))
    assert not validator.validate(_record(stage, {"peer_id": "peerA", "access_token": valid},
                                          RSAPrivateKey().get_public_key().to_bytes()))
    assert validator.validate(_record(manifest_key("run"), {}, authority_key))
    assert not validator.validate(_record(manifest_key("run"), {}, HOLDER_KEY))
    assert validator.validate(_record("another_app_key", {}, HOLDER_KEY))
    # a newer validator (a revocation) merges into the running one
    assert validator.merge_with(TokenRecordValidator("run", authority_key, frozenset({"k1"})))
    assert not validator.validate(_record(stage, {"peer_id": "peerA", "access_token": valid}, HOLDER_KEY))
    # it crosses the pipe to the DHT process small: no per-stage key sets in its pickled state
    assert set(validator.__getstate__()) == {"run_id", "authority", "revoked"}


_VALID = issue_token(AUTHORITY, "k1", "peerA", HOLDER_KEY, 4e9)


@pytest.mark.parametrize("key, value, signer, stored", [
    # every key of the run is covered (issue 22): without a token, refused
    (stage_key("run", 0), {"peer_id": "peerA"}, HOLDER_KEY, False),
    (trainers_key("run"), {"trainer_id": "peerA"}, HOLDER_KEY, False),
    (telemetry_key("run"), {"peer_id": "peerA"}, HOLDER_KEY, False),
    (metrics_key("run"), {"peer_id": "peerA"}, HOLDER_KEY, False),
    (bans_key("run"), {"reporter": "peerA"}, HOLDER_KEY, False),
    (store_key("run"), {"peer_id": "peerA"}, HOLDER_KEY, False),  # only the authority announces stores
    (bootstraps_key("run"), {"peer_id": "peerA"}, HOLDER_KEY, False),
    (control_key("run"), {}, HOLDER_KEY, False),
    # with the signer's own token, naming the signer: stored
    (stage_key("run", 0), {"peer_id": "peerA", "access_token": _VALID}, HOLDER_KEY, True),
    (trainers_key("run"), {"trainer_id": "peerA", "access_token": _VALID}, HOLDER_KEY, True),
    (telemetry_key("run"), {"peer_id": "peerA", "access_token": _VALID}, HOLDER_KEY, True),
    (metrics_key("run"), {"peer_id": "peerA", "access_token": _VALID}, HOLDER_KEY, True),
    (bans_key("run"), {"reporter": "peerA", "access_token": _VALID}, HOLDER_KEY, True),
    (store_key("run"), {"peer_id": "boot"}, AUTHORITY.get_public_key().to_bytes(), True),
    # records bound to their signer: a valid token, but the record names another peer
    (stage_key("run", 0), {"peer_id": "peerB", "access_token": _VALID}, HOLDER_KEY, False),
    (trainers_key("run"), {"trainer_id": "peerB", "access_token": _VALID}, HOLDER_KEY, False),
    (telemetry_key("run"), {"peer_id": "peerB", "access_token": _VALID}, HOLDER_KEY, False),
    (metrics_key("run"), {"peer_id": "peerB", "access_token": _VALID}, HOLDER_KEY, False),
    (bans_key("run"), {"reporter": "peerB", "access_token": _VALID}, HOLDER_KEY, False),
    # a delegator announces its delegate's address under its own signature (``delegate_of``)
    (stage_key("run", 0), {"peer_id": "peerB", "delegate_of": "peerA", "access_token": _VALID}, HOLDER_KEY, True),
    (stage_key("run", 0), {"peer_id": "peerB", "delegate_of": "peerC", "access_token": _VALID}, HOLDER_KEY, False),
], ids=lambda v: v if isinstance(v, (bool, str)) and len(str(v)) < 30 else None)
def test_every_key_of_the_run_is_covered_and_bound_to_its_signer(key, value, signer, stored) -> None:
    validator = TokenRecordValidator("run", AUTHORITY.get_public_key().to_bytes())
    assert validator.validate(_record(key, value, signer)) == stored


@pytest.mark.parametrize("failures_at, now, wait", [
    ([], 0.0, 0.0),
    ([0.0, 1.0], 2.0, 0.0),
    ([0.0, 1.0, 2.0], 3.0, 97.0),
    ([0.0, 1.0, 2.0], 100.5, 0.0),
])
def test_login_limiter_table(failures_at: list[float], now: float, wait: float) -> None:
    limiter = LoginLimiter(attempts=3, window=100.0)
    for at in failures_at:
        limiter.failed("1.2.3.4", now=at)
    assert limiter.retry_after("1.2.3.4", now=now) == pytest.approx(wait)
    assert limiter.retry_after("5.6.7.8", now=now) == 0.0
