"""Messages of the delegation session protocol (``swarm.delegation.start | poll | stop | status``).

A *delegator* (a weak machine: it keeps its identity and private key) has a *delegate* (a strong peer
started with ``--accept-delegations``) serve a stage of the run on its behalf. The delegate loads the
stage as an extra slot and computes whatever trainers send it; the delegator announces that replica in
the DHT under its own signed record (``PeerRecord.peer_id`` = the delegate, which trainers call;
``delegate_of`` = the delegator), collects the delegate's receipts and signs them into its own
contribution ledger, so the bootstrap credits the delegator and notes the delegate::

    delegator                        delegate                         trainer          bootstrap
        | start(token, stage?) -------->|  token (constant time), capacity,  |                 |
        |<------ session id, stage, ttl |  stage free here? then load it     |                 |
        | poll(session, ack) ---------->|  (state from a replica)            |                 |
        |<- state=loading, record       |                                    |                 |
        | poll (every ~5 s) ----------->|                                    |                 |
        |<- state=active, record        |                                    |                 |
        | DHT: {run}_stage_i, signed by the delegator:                       |                 |
        |      peer_id=delegate, delegate_of=delegator ------------------->  | reads route     |
        |                               |<---- forward / backward ---------- |                 |
        |                               |  receipt per call: request id,     |                 |
        |                               |  tokens, sha256 of the output      |                 |
        | poll(session, ack=n) -------->|  drops receipts < n                |                 |
        |<----- receipts n.., record    |                                    |                 |
        | signs one ledger entry (receipts' digest, delegate noted) with its own key           |
        | swarm.ledger.submit ----------------------------------------------------------------->|
        |                               |           checks caller == signer, chain, signature;  |
        |                               |           tallies for the delegator, notes delegate   |
        | stop(session, ack) ---------->|  last receipts back, stage released                  |
        |<-------- receipts, stopped    |                                    |                 |

A session that is not polled for its TTL (default 330 s) expires and its stage is released; so does
every session of a token the delegate no longer accepts. A call about a session the delegate does not
hold answers ``UnknownSession`` naming why (never issued, stopped, expired, revoked).

Versioned on its own (``DELEGATION_VERSION``), apart from the stage protocol; requests are checked with
``net.rpc.parse_request`` and replies travel in the project's ``{"ok": ...}`` /
``{"error": ...}`` envelope.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import Field

from core.messages import FrozenModel
from dht.schemas import PeerRecord
from net.rpc import Message, parse_request
from core.types import LayerRange, PeerId, StageIndex

__all__ = [
    "DELEGATION_VERSION",
    "START",
    "POLL",
    "STOP",
    "STATUS",
    "MAX_RECEIPTS",
    "SessionState",
    "LIVE_STATES",
    "Receipt",
    "StartRequest",
    "StartResponse",
    "PollRequest",
    "PollResponse",
    "StopRequest",
    "StopResponse",
    "StatusRequest",
    "SessionInfo",
    "DelegateStatus",
    "parse_delegation_request",
]

DELEGATION_VERSION = 1
START = "swarm.delegation.start"
POLL = "swarm.delegation.poll"
STOP = "swarm.delegation.stop"
STATUS = "swarm.delegation.status"
MAX_RECEIPTS = 1024
"""Receipts per poll reply (about 150 bytes each); the rest come with the next poll."""


class SessionState(str, Enum):
    LOADING = "loading"  # the delegate is loading the stage (and its state from a replica)
    ACTIVE = "active"  # the stage is served; trainers may route to it
    STOPPED = "stopped"  # the delegator stopped it
    EXPIRED = "expired"  # not polled for its TTL
    REVOKED = "revoked"  # its token is no longer accepted
    FAILED = "failed"  # loading the stage failed


LIVE_STATES = (SessionState.LOADING, SessionState.ACTIVE)


class _Message(Message):
    version: int = DELEGATION_VERSION


class Receipt(FrozenModel):
    """One microbatch pass the delegate computed for the session's stage: ``digest`` is the sha256 of
    the output tensor it sent back (hidden states of a forward, input gradients of a backward), so
    the delegator signs what was actually returned."""

    seq: int = Field(ge=0)
    request_id: str = Field(min_length=1, max_length=64)
    kind: str = Field(pattern="^(forward|backward)$")
    tokens: int = Field(ge=0)
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    at: float = Field(description="wall-clock time the delegate finished it")


class StartRequest(_Message):
    """Open a session: serve ``stage`` (None: the delegate picks the stage that needs it most) for the
    caller, who must be ``delegator`` (libp2p authenticates the caller's peer id)."""

    token: str = Field(min_length=1, max_length=512)
    delegator: PeerId = Field(min_length=1, max_length=128)
    stage: StageIndex | None = Field(None, ge=0)


class StartResponse(_Message):
    session_id: str
    stage: StageIndex
    layers: LayerRange
    ttl: float = Field(description="seconds the session lives without a poll")
    gpu_count: int = Field(0, ge=0, description="GPUs of the delegate")


class PollRequest(_Message):
    """Keep the session alive and fetch receipts from ``ack`` on (receipts before ``ack`` are recorded
    by the delegator, so the delegate drops them; a lost reply costs nothing)."""

    session_id: str = Field(min_length=1, max_length=64)
    ack: int = Field(0, ge=0)


class PollResponse(_Message):
    session_id: str
    state: SessionState
    record: PeerRecord | None = Field(None, description="the replica as the delegator should announce it "
                                      "(set once the stage is served)")
    receipts: list[Receipt] = Field(default_factory=list, max_length=MAX_RECEIPTS)
    dropped: int = Field(0, ge=0, description="receipts lost because too many were waiting unpolled")
    expires_in: float
    gpu_count: int = Field(0, ge=0)
    reason: str = ""


class StopRequest(_Message):
    session_id: str = Field(min_length=1, max_length=64)
    ack: int = Field(0, ge=0)


class StopResponse(_Message):
    """The session's last receipts (from ``ack`` on); its stage is released."""

    session_id: str
    receipts: list[Receipt] = Field(default_factory=list, max_length=MAX_RECEIPTS)


class StatusRequest(_Message):
    """How the delegate stands: its sessions (no token needed: the same as its DHT records show)."""


class SessionInfo(FrozenModel):
    session_id: str
    status: SessionState
    delegator: PeerId
    stage: StageIndex
    gpu_count: int
    microbatches: int = Field(description="distinct microbatches computed (request ids)")
    tokens: int = Field(description="tokens processed, forward and backward each counted")
    age_s: float
    reason: str = ""


class DelegateStatus(_Message):
    peer_id: PeerId
    total_sessions: int = Field(description="sessions started since the delegate started")
    active_sessions: int = Field(description="sessions loading or serving now")
    max_sessions: int
    gpu_count: int
    sessions: list[SessionInfo] = Field(description="live sessions, then the most recently ended ones")


def parse_delegation_request(model: type[_Message], payload: Any) -> _Message:
    """Validate a delegation request (its own protocol version, see the module docstring)."""
    return parse_request(model, payload, version=DELEGATION_VERSION, protocol="delegation protocol")
