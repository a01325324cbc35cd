"""Access tokens of a keyed run, and the DHT validator that enforces them.

A token is hivemind's ``AccessToken`` protobuf, signed by the run's *authority* (the bootstrap's
persistent RSA key, the same one that signs its manifest and run-control records):

    username    = "<api key id>:<libp2p peer id>"   who holds it, and through which key
    public_key  = the holder's DHT record key        (the ``[owner:...]`` of its signed subkeys)
    expiration_time, signature

``TokenRecordValidator`` (in every node's DHT process, on store and on every record a lookup
returns) then refuses, under this run's keys: stage records, trainer records, metrics reports,
telemetry records and ban reports that carry no valid token of their signer, or that name another
peer than the token's holder (``holds``); and manifest, run-control, bootstraps and checkpoint-store
records not signed by the authority. Revocation is a list of key ids in the run-control
record, pushed into the validator within seconds (tokens themselves live ``token_ttl``, long enough
that a swarm outlives a bootstrap outage).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from dht.schemas import (
    MAX_STAGES,
    bans_key,
    bootstraps_key,
    control_key,
    manifest_key,
    metrics_key,
    stage_key,
    store_key,
    telemetry_key,
    trainers_key,
)
from core.errors import AuthRejected
from core.types import PeerId

__all__ = [
    "TokenClaims",
    "issue_token",
    "verify_token",
    "owner_of",
    "token_key_id",
    "holds",
    "TokenRecordValidator",
    "load_or_create_private_key",
]

_OWNER_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)


@dataclass(frozen=True)
class TokenClaims:
    key_id: str
    peer_id: PeerId
    public_key: bytes
    expires: float


def _payload(token: AccessToken) -> bytes:
    unsigned = AccessToken()
    unsigned.CopyFrom(token)
    unsigned.signature = b""
    return unsigned.SerializeToString(deterministic=True)


def issue_token(authority: RSAPrivateKey, key_id: str, peer_id: PeerId, public_key: bytes, expires: float) -> str:
    """A signed token, base64 text (it travels in JSON records and msgpack messages)."""
    token = AccessToken(username=f"{key_id}:{peer_id}", public_key=public_key,
                        expiration_time=datetime.fromtimestamp(expires, timezone.utc).isoformat())
    token.signature = authority.sign(_payload(token))
    return base64.b64encode(token.SerializeToString()).decode()


def verify_token(text: str, authority: RSAPublicKey, *, now: float | None = None,
                 revoked: frozenset[str] | set[str] = frozenset()) -> TokenClaims:
    """The token's claims, or ``AuthRejected`` naming what is wrong with it."""
    try:
        token = AccessToken.FromString(base64.b64decode(text, validate=True))
        key_id, peer_id = token.username.split(":", 1)
        expires = datetime.fromisoformat(token.expiration_time).timestamp()
    except Exception:  # bad base64, a protobuf decode error, a malformed field: all the same to us
        raise AuthRejected("the access token is malformed") from None
    if not authority.verify(_payload(token), token.signature):
        raise AuthRejected("the access token is not signed by this run's bootstrap")
    if expires <= (get_dht_time() if now is None else now):
        raise AuthRejected(f"the access token of key {key_id} has expired")
    if key_id in revoked:
        raise AuthRejected(f"API key {key_id} has been revoked")
    return TokenClaims(key_id, peer_id, bytes(token.public_key), expires)


def token_key_id(text: str | None) -> str | None:
    """The key id a token names, without checking its signature (for a node whose DHT validator
    already checked the record carrying it); None if it is malformed."""
    try:
        return AccessToken.FromString(base64.b64decode(text or "", validate=True)).username.split(":", 1)[0] or None
    except Exception:  # bad base64, a protobuf decode error, no username: all the same to us
        return None


def owner_of(subkey: bytes | None) -> bytes | None:
    """The RSA public key in a signed subkey's ``[owner:...]`` marker."""
    found = _OWNER_RE.findall(subkey or b"")
    return found[0] if len(found) == 1 else None


def load_or_create_private_key(path) -> RSAPrivateKey:
    """A persistent RSA key (DER, mode 0600), so the run's authority survives restarts."""
    key = RSAPrivateKey()
    if path.is_file():
        key.__setstate__({"_private_key": path.read_bytes()})
    else:
        path.write_bytes(key.to_bytes())
        path.chmod(0o600)
    return key


class TokenRecordValidator(RecordValidatorBase):
    """Enforce keys on this run's records (see the module docstring). ``merge_with`` takes the newer
    authority and revocation list, so ``dht.add_validators([...])`` again updates a running node."""

    def __init__(self, run_id: str, authority: bytes, revoked: frozenset[str] = frozenset()):
        self.__setstate__({"run_id": run_id, "authority": authority, "revoked": frozenset(revoked)})

    def __getstate__(self) -> dict:
        # only the inputs cross the pipe to the DHT process: the key sets would make the message
        # tens of KiB (see the DHT pipe race in docs/design.md), and the RSA key is not picklable
        return {"run_id": self.run_id, "authority": self.authority, "revoked": self.revoked}

    def __setstate__(self, state: dict) -> None:
        self.run_id, self.authority, self.revoked = state["run_id"], state["authority"], state["revoked"]
        self._authority_key = RSAPublicKey.from_bytes(self.authority)
        run = self.run_id
        self._owner_only = {_hashed(manifest_key(run)), _hashed(control_key(run)), _hashed(bootstraps_key(run)),
                            _hashed(store_key(run))}
        # key -> the fields of its value that may name the token's holder (the record is bound to its signer)
        self._tokened: dict[bytes, tuple[str, ...]] = {_hashed(stage_key(run, s)): _STAGE_HOLDER for s in range(MAX_STAGES)}
        self._tokened |= {_hashed(metrics_key(run)): ("peer_id",), _hashed(telemetry_key(run)): ("peer_id",),
                          _hashed(trainers_key(run)): ("trainer_id",), _hashed(bans_key(run)): ("reporter",)}

    def validate(self, record: DHTRecord) -> bool:
        if record.key in self._owner_only:
            return owner_of(record.subkey) == self.authority
        if record.key not in self._tokened:
            return True
        owner = owner_of(record.subkey)
        if owner == self.authority:
            return True
        try:
            value = MSGPackSerializer.loads(record.value)
            claims = verify_token(value.get("access_token") or "", self._authority_key, revoked=self.revoked)
        except Exception:  # AuthRejected, or a value that is not even a dict: refused either way
            return False
        return owner is not None and claims.public_key == owner and holds(value, claims.peer_id,
                                                                          self._tokened[record.key])

    @property
    def priority(self) -> int:
        return 5  # after the signature validator (10) has checked and stripped the signature

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if isinstance(other, TokenRecordValidator) and other.run_id == self.run_id:
            self.authority, self.revoked = other.authority, other.revoked
            self._authority_key = other._authority_key
            return True
        return False


_STAGE_HOLDER = ("peer_id", "delegate_of")


def holds(value: dict, peer_id: PeerId, fields: tuple[str, ...]) -> bool:
    """Whether a record names the token's holder ``peer_id`` where it names who it is about: its
    first field in ``fields`` must be ``peer_id``, or (a stage record a delegator announces for its
    delegate) a later one may be, when set. A record naming another peer than its signer is refused."""
    first, *others = fields
    if value.get(first) == peer_id:
        return True
    return any(value.get(field) is not None and value.get(field) == peer_id for field in others)


def _hashed(key: str) -> bytes:
    return DHTID.generate(source=key).to_bytes()
