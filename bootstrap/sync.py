"""State sync between the bootstraps of one run (a primary and its ``--mirror`` s): the messages, the
merge rule, and the authority signature that lets only the run's owner sync.

Each bootstrap keeps its own ``state.db``; every ``bootstrap.sync_interval`` seconds it sends the
others its snapshot (keys and run state) over ``swarm.bootstrap.sync`` and gets theirs back, and both
sides fold the other's snapshot in with ``merge_key`` / ``merge_run_state``:

- a key known to one side only is copied (a key created on either works through both);
- ``revoked`` is the earliest revocation seen (monotonic: once revoked, revoked everywhere);
- name and expiry follow the row with the newer ``updated_at`` (last writer wins), ties keep the
  smaller tuple so that both sides settle on the same row;
- the run state follows the newer ``run_state_at``; a tie goes to the more final state
  (stopped > paused > running);
- the owner's banned peers are the union of both lists (monotonic, as revocations are: a peer
  banned on either is banned on both), and ``banned_at`` the later of the two, so both sides
  publish the same run-control record.

Both merges are commutative and idempotent, so the order and repetition of syncs do not matter.

Who may sync: a message is signed by the run's *authority* key (which every bootstrap of the run
holds, and nobody else), names its sender (checked against the libp2p-authenticated caller) and its
target (the receiver's peer id, so it cannot be replayed to another bootstrap), and carries a
timestamp and a random nonce: the receiver refuses a message more than ``MAX_SKEW`` seconds off or
a nonce it has seen in that window. A reply is signed the same way and names the request's nonce.
"""

from __future__ import annotations

import secrets
from typing import Annotated

import msgpack
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from pydantic import Field

from core.messages import PROTOCOL_VERSION, FrozenModel
from core.errors import AuthRejected, StateError
from core.types import PeerId

__all__ = [
    "SYNC",
    "MAX_SKEW",
    "KeyRow",
    "RunStateRow",
    "SyncMessage",
    "merge_key",
    "merge_run_state",
    "merge_banned",
    "sign_sync",
    "verify_sync",
    "NonceWindow",
]

SYNC = "swarm.bootstrap.sync"
MAX_SKEW = 60.0
MAX_KEYS = 10_000
MAX_BANNED = 512  # as many as state.db keeps
_STATE_RANK = {"running": 0, "paused": 1, "stopped": 2}


class KeyRow(FrozenModel):
    """One ``api_keys`` row as it travels between bootstraps (the hash, never a secret)."""

    id: str = Field(pattern=r"^[0-9a-f]{8}$")
    name: str = Field(min_length=1, max_length=100)
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    created: float
    expires: float | None = None
    revoked: float | None = None
    updated_at: float = 0.0
    scopes: str = Field("join", pattern=r"^(join|api|admin)(,(join|api|admin)){0,2}$")


class RunStateRow(FrozenModel):
    state: str = Field(pattern="^(running|paused|stopped)$")
    at: float = 0.0


class SyncMessage(FrozenModel):
    """A bootstrap's snapshot, signed with the run's authority key (request and reply alike)."""

    version: int = PROTOCOL_VERSION
    run_id: str = Field(min_length=1, max_length=128)
    sender: str = Field(min_length=1, max_length=128)
    target: PeerId = Field(min_length=1, max_length=128)
    at: float
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$")
    in_reply_to: str = Field("", max_length=32)
    keys: list[KeyRow] = Field(default_factory=list, max_length=MAX_KEYS)
    run_state: RunStateRow
    banned: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(default_factory=list,
                                                                             max_length=MAX_BANNED)
    banned_at: float = 0.0
    signature: str = Field("", max_length=1024, description="the authority's signature (base64)")


# -- the merge rule (pure) ----------------------------------------------------------------------
def merge_key(local: KeyRow | None, remote: KeyRow) -> KeyRow | None:
    """The row this side should store after seeing ``remote``, or None when ``local`` already is it.
    ``StateError`` when the two rows are different keys under one id (never merged)."""
    if local is None:
        return remote
    if local.hash != remote.hash:
        raise StateError(f"key {local.id} has a different secret on the other bootstrap; this side's is kept")
    newer = max(local, remote, key=_lww_order)
    revoked = [r for r in (local.revoked, remote.revoked) if r is not None]
    merged = newer.model_copy(update={
        "created": min(local.created, remote.created),
        "revoked": min(revoked) if revoked else None,
        "updated_at": max(local.updated_at, remote.updated_at),
    })
    return None if merged == local else merged


def merge_run_state(local: RunStateRow, remote: RunStateRow) -> RunStateRow | None:
    """The run state after seeing ``remote`` (last writer wins), or None when ``local`` stays."""
    if (remote.at, _STATE_RANK[remote.state]) > (local.at, _STATE_RANK[local.state]):
        return remote
    return None


def merge_banned(local: list[str], remote: list[str]) -> list[str]:
    """The banned list after seeing ``remote``: this side's, then the other's new ones, the newest
    ``MAX_BANNED`` kept."""
    known = set(local)
    return (list(local) + [p for p in remote if p not in known and not known.add(p)])[-MAX_BANNED:]


def _lww_order(row: KeyRow) -> tuple:
    return (row.updated_at, row.name, row.expires if row.expires is not None else float("inf"))


# -- signing ------------------------------------------------------------------------------------
def _payload(message: SyncMessage) -> bytes:
    return msgpack.packb(message.model_dump(mode="python", exclude={"signature"}), use_bin_type=True)


def sign_sync(authority: RSAPrivateKey, *, run_id: str, sender: str, target: PeerId, at: float,
              keys: list[KeyRow], run_state: RunStateRow, banned: list[str] = (), banned_at: float = 0.0,
              in_reply_to: str = "") -> SyncMessage:
    unsigned = SyncMessage(run_id=run_id, sender=sender, target=target, at=at, nonce=secrets.token_hex(16),
                           in_reply_to=in_reply_to, keys=keys, run_state=run_state, banned=list(banned),
                           banned_at=banned_at)
    return unsigned.model_copy(update={"signature": authority.sign(_payload(unsigned)).decode()})


class NonceWindow:
    """Nonces seen in the last ``2 x MAX_SKEW`` seconds (older messages are refused by their time)."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}

    def check_and_add(self, nonce: str, now: float) -> None:
        self.seen = {n: t for n, t in self.seen.items() if now - t < 2 * MAX_SKEW}
        if nonce in self.seen:
            raise AuthRejected("sync: this message was already received (a replay)")
        self.seen[nonce] = now


def verify_sync(message: SyncMessage, authority: RSAPublicKey, *, run_id: str, sender: str | None,
                target: PeerId, now: float, nonces: NonceWindow | None = None, in_reply_to: str = "") -> None:
    """``AuthRejected`` naming the problem unless ``message`` is a fresh sync of this run, from
    ``sender`` (None: not checked) to ``target``, signed by the run's authority."""
    if message.run_id != run_id:
        raise AuthRejected(f"sync: the message is for run {message.run_id!r}, not {run_id!r}")
    if not authority.verify(_payload(message), message.signature.encode()):
        raise AuthRejected("sync: not signed by this run's authority key")
    if sender is not None and message.sender != sender:
        raise AuthRejected(f"sync: signed for sender {message.sender[-8:]}, but sent by {sender[-8:]}")
    if message.target != target:
        raise AuthRejected(f"sync: addressed to {message.target[-8:]}, not to this bootstrap")
    if abs(now - message.at) > MAX_SKEW:
        raise AuthRejected(f"sync: the message is {now - message.at:+.0f} s old (more than {MAX_SKEW:.0f} s off)")
    if message.in_reply_to != in_reply_to:
        raise AuthRejected("sync: the reply does not answer this request")
    if nonces is not None:
        nonces.check_and_add(message.nonce, now)
