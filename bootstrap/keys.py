"""API keys as values: how a key looks, how it is hashed, and when it is usable (pure functions).

A key is ``swk_<id>_<secret>``: the id (8 hex digits) is public and names the key in lists, the audit
log and ``swarm keys revoke``; the secret is 32 random bytes. Only the SHA-256 of the whole key is
stored. A key has *scopes* (``SCOPES``): ``join`` (trade it for a token and serve or train in the
run), ``api`` (call a ``swarm serve-api`` of the run), ``admin`` (the dashboard's admin API, sent as
``Authorization: Bearer``); a key is refused for what its scopes do not name. A slow password hash (bcrypt, argon2) protects low-entropy passwords from guessing; a key
with 256 random bits cannot be guessed, so a fast hash is the right one here (and it keeps checking
a key on every token request cheap).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from core.errors import AuthRejected, ConfigError

__all__ = [
    "KEY_PREFIX",
    "SCOPES",
    "parse_scopes",
    "ApiKey",
    "NewKey",
    "generate_key",
    "hash_key",
    "key_id_of",
    "parse_duration",
    "check_key",
]

KEY_PREFIX = "swk_"
_KEY_RE = re.compile(r"^swk_([0-9a-f]{8})_([A-Za-z0-9_-]{20,64})$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
SCOPES = ("join", "api", "admin")
_USES = {"join": "join the run", "api": "use the inference API", "admin": "use the admin API"}


@dataclass(frozen=True)
class ApiKey:
    """A stored key: everything but the secret."""

    id: str
    name: str
    created: float
    expires: float | None = None
    revoked: float | None = None
    scopes: tuple[str, ...] = ("join",)

    def state(self, now: float) -> str:
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and self.expires <= now:
            return "expired"
        return "active"


@dataclass(frozen=True)
class NewKey:
    """A key just made: the secret is here once, to be shown once, and is never stored."""

    key: ApiKey
    secret: str


def generate_key() -> tuple[str, str]:
    """A fresh ``(id, full key)``."""
    key_id = secrets.token_hex(4)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def hash_key(full_key: str) -> str:
    return hashlib.sha256(full_key.encode()).hexdigest()


def key_id_of(full_key: str) -> str:
    """The id inside a key, or ``AuthRejected`` if the text is not shaped like a swarm key."""
    match = _KEY_RE.match(full_key.strip())
    if match is None:
        raise AuthRejected("that is not a swarm API key (expected swk_<id>_<secret>, as `swarm keys create` prints)")
    return match.group(1)


def parse_scopes(scopes: "str | list[str] | tuple[str, ...]") -> tuple[str, ...]:
    """``"join,api"`` or ``["join", "api"]`` -> ``("join", "api")`` in ``SCOPES`` order; ``ConfigError``
    names an unknown or missing scope."""
    names = [s.strip() for s in (scopes.split(",") if isinstance(scopes, str) else scopes) if s.strip()]
    unknown = sorted(set(names) - set(SCOPES))
    if unknown:
        raise ConfigError(f"unknown key scope {', '.join(map(repr, unknown))}: use {', '.join(SCOPES)}")
    if not names:
        raise ConfigError(f"a key needs at least one scope: {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in names)


def check_key(stored: ApiKey | None, stored_hash: str | None, full_key: str, now: float,
              scope: str | None = None) -> ApiKey:
    """Decide whether ``full_key`` is usable now (for ``scope``, if given); ``AuthRejected`` says why not."""
    key_id = key_id_of(full_key)
    if stored is None or stored_hash is None or not hmac.compare_digest(stored_hash, hash_key(full_key.strip())):
        raise AuthRejected(f"unknown API key {key_id}")
    state = stored.state(now)
    if state != "active":
        raise AuthRejected(f"API key {key_id} ({stored.name}) is {state}")
    if scope is not None and scope not in stored.scopes:
        raise AuthRejected(f"API key {key_id} ({stored.name}) has scope {','.join(stored.scopes)}: it cannot "
                           f"{_USES[scope]} (that needs a key with scope {scope}: swarm keys create --scope {scope})")
    return stored


def parse_duration(text: str) -> float:
    """``"30d"``, ``"12h"``, ``"90m"``, ``"2w"``, ``"45s"`` -> seconds."""
    match = _DURATION_RE.match(text)
    if match is None:
        raise ConfigError(f"{text!r} is not a duration: use a number and a unit, like 30d, 12h, 90m, 2w or 45s")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ConfigError(f"duration {text!r} must be more than zero")
    return seconds
