"""One error tree for the whole project.

    SwarmError                      anything swarm raises on purpose
    ├── ConfigError                 a setting, CLI argument or config file is wrong
    ├── ModelLoadError              a model cannot be resolved or read
    │   ├── UnsupportedArchitecture     config.json names a family swarm has no blocks for
    │   ├── StateMismatch               a stage state or checkpoint does not fit this stage / run
    │   └── NoTokenizer                 text was given for a model with no tokenizer (nor byte vocabulary)
    ├── BadRequest                  a peer was sent something malformed (shape, dtype, stage, payload)
    │   └── WrongStage                  the request names layers this peer does not hold
    ├── ProtocolMismatch            the other side speaks another protocol version
    ├── InvalidOutput               a peer returned a result that cannot be right (NaN, huge, wrong shape,
    │                                   or unlike another replica's in a spot check): it is banned
    ├── CacheMiss                   a backward asked for a forward this peer no longer holds
    ├── StaleReplica                a replica is behind the run's step and must not be averaged with
    ├── PeerUnavailable             a peer did not answer or is not in the DHT
    │   ├── StageTimeout                a stage call ran past its deadline
    │   └── AveragingFailed             replicas could not average a step with the expected group
    ├── NoRoute                     some stage has no live peer
    ├── CheckpointMissing           no checkpoint of the requested part is stored
    ├── AuthRejected                credentials missing or wrong
    ├── StateError                  the bootstrap's saved state is corrupt or from a newer swarm
    ├── RunStopped                  the run owner stopped the run
    ├── LeaseLost                   a data shard this trainer leased was given to another (its lease expired)
    ├── CapacityExceeded            a peer is full
    ├── InsufficientMemory          not even one stage of the run fits in this peer's memory
    └── DelegationRefused           a strong peer declined a delegation session
        └── UnknownSession              a delegation session id the delegate does not hold (never
                                        issued, stopped, expired or ended by a revoked token)

Errors cross the wire as ``(code, message)``: ``code`` is the class name, so the receiving side
re-raises the same type (see ``error_from_wire``). What the data plane does about each type is decided
in two tables below: ``RETRYABLE`` (may the same request be tried again at all) and ``RECOVERY`` (what
the trainer does when a stage call fails: retry the same peer, re-route to another replica, or abort).

This module imports nothing from the project so every layer (shards included) can use it.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "SwarmError",
    "ConfigError",
    "ModelLoadError",
    "UnsupportedArchitecture",
    "StateMismatch",
    "CheckpointMissing",
    "NoTokenizer",
    "BadRequest",
    "WrongStage",
    "ProtocolMismatch",
    "CacheMiss",
    "InvalidOutput",
    "StaleReplica",
    "PeerUnavailable",
    "StageTimeout",
    "AveragingFailed",
    "NoRoute",
    "AuthRejected",
    "StateError",
    "RunStopped",
    "LeaseLost",
    "CapacityExceeded",
    "InsufficientMemory",
    "DelegationRefused",
    "UnknownSession",
    "RETRYABLE",
    "error_from_wire",
    "is_retryable",
    "Recovery",
    "RECOVERY",
    "recovery_for",
]


class SwarmError(Exception):
    """Base of every error swarm raises on purpose; the message is meant for a person."""


class ConfigError(SwarmError):
    """A setting, CLI argument or config file is wrong."""


class ModelLoadError(SwarmError):
    """A model cannot be resolved (no such dir or hub id) or its files cannot be read."""


class UnsupportedArchitecture(ModelLoadError):
    """config.json names a model family that swarm has no block wrapper for."""


class StateMismatch(ModelLoadError):
    """A stage state (from a replica or a checkpoint) belongs to another run, stage, layout or dtype."""


class NoTokenizer(ModelLoadError):
    """Text was given for a model that has no tokenizer files and no byte-level vocabulary."""


class BadRequest(SwarmError):
    """A peer received a malformed request; the peer keeps serving others."""


class WrongStage(BadRequest):
    """The request names a stage or layers that this peer does not serve."""


class ProtocolMismatch(SwarmError):
    """The other side speaks an incompatible protocol version."""


class InvalidOutput(SwarmError):
    """A peer's reply cannot be right: values that are not finite or absurdly large, a wrong shape, or
    an output unlike what another replica of the stage computes from the same input (a spot check).
    The peer is routed around and banned; its work is replayed on another replica."""


class CacheMiss(SwarmError):
    """A backward referred to a forward whose graph this peer no longer holds; resend the inputs."""


class StaleReplica(SwarmError):
    """A replica missed collaborative steps that its peers applied; it must load the current state
    from a live replica before it takes part again."""


class PeerUnavailable(SwarmError):
    """A peer did not answer, refused the connection or has left the DHT."""


class StageTimeout(PeerUnavailable):
    """A call to a stage ran past its deadline."""


class AveragingFailed(PeerUnavailable):
    """The replicas of a stage could not average a step's gradients with exactly the expected group
    (a member left or missed the round). Nothing was applied; the step can be tried again."""


class NoRoute(SwarmError):
    """At least one stage has no live peer serving it."""


class CheckpointMissing(SwarmError):
    """A checkpoint store holds no checkpoint of the requested part (a stage, or a trainer's parts)."""


class AuthRejected(SwarmError):
    """Credentials are missing, expired or wrong."""


class StateError(SwarmError):
    """The bootstrap's SQLite state cannot be used: corrupt, unreadable, or written by a newer swarm.
    Never answered by starting afresh: the keys and the audit log in it must not be lost silently."""


class RunStopped(SwarmError):
    """The run owner stopped the run (``swarm run stop``); trainers end and peers leave."""


class LeaseLost(SwarmError):
    """The bootstrap gave a data shard this trainer had leased to another trainer: the lease expired
    unrenewed (a trainer stalled past its TTL). The trainer stops reading that shard and leases another,
    so no sample is trained twice in an epoch."""


class CapacityExceeded(SwarmError):
    """The peer has no room for more work or sessions right now."""


class InsufficientMemory(SwarmError):
    """Not even one stage of the run (parameters, gradients, optimizer state) fits in this peer."""


class DelegationRefused(SwarmError):
    """A strong peer declined to start a delegation session (unsupported work, a stage it cannot host)."""


class UnknownSession(DelegationRefused):
    """The delegate holds no session with that id: it never issued it, or the session was stopped,
    expired (not polled for its TTL) or ended because its token was revoked. The delegator starts a
    new one."""


# Decided once, here: may the caller try the same request again (on the same or another replica)?
# Bad requests and protocol mismatches would fail the same way again; unavailability may pass.
RETRYABLE: dict[type[SwarmError], bool] = {
    BadRequest: False,
    ProtocolMismatch: False,
    AuthRejected: False,
    PeerUnavailable: True,
    CapacityExceeded: True,
    CacheMiss: True,
}

_BY_NAME: dict[str, type[SwarmError]] = {
    cls.__name__: cls
    for cls in (
        SwarmError, ConfigError, ModelLoadError, UnsupportedArchitecture, NoTokenizer, BadRequest, WrongStage,
        ProtocolMismatch, CacheMiss, InvalidOutput, StaleReplica, PeerUnavailable, StageTimeout, AveragingFailed,
        NoRoute, AuthRejected, CapacityExceeded, DelegationRefused, UnknownSession, StateMismatch,
        CheckpointMissing, StateError, RunStopped, InsufficientMemory, LeaseLost,
    )
}


def is_retryable(error: BaseException) -> bool:
    """Look the error's type (or its nearest listed base) up in ``RETRYABLE``."""
    for cls in type(error).__mro__:
        if cls in RETRYABLE:
            return RETRYABLE[cls]
    return False


def error_from_wire(code: str, message: str) -> SwarmError:
    """Rebuild the error a peer reported; unknown codes become a plain ``SwarmError``."""
    cls = _BY_NAME.get(code, SwarmError)
    return cls(message)


class Recovery(str, Enum):
    """What the trainer does when a call to a stage's peer fails."""

    RETRY = "retry"  # the same peer again (every stage call is idempotent by request id)
    REROUTE = "reroute"  # ban the peer for a while and replay its work on another replica
    ABORT = "abort"  # the request itself is wrong: it would fail on every replica


# Decided once, here. A peer that is gone, hangs or errs is routed around (its work replayed on
# another replica of the stage); when it is the stage's only replica the trainer retries it, since a
# lost reply is far more common than a dead peer. A malformed request fails everywhere: abort. A peer
# that now serves other layers, or speaks another protocol, is routed around like a dead one.
RECOVERY: dict[type[SwarmError], Recovery] = {
    WrongStage: Recovery.REROUTE,
    BadRequest: Recovery.ABORT,
    ProtocolMismatch: Recovery.REROUTE,
    AuthRejected: Recovery.ABORT,
    PeerUnavailable: Recovery.REROUTE,
    CapacityExceeded: Recovery.REROUTE,
    InvalidOutput: Recovery.REROUTE,
    SwarmError: Recovery.REROUTE,  # an internal error on that peer: another replica may do better
}


def recovery_for(error: BaseException) -> Recovery:
    """Look the error's type (or its nearest listed base) up in ``RECOVERY``; non-swarm errors abort."""
    for cls in type(error).__mro__:
        if cls in RECOVERY:
            return RECOVERY[cls]
    return Recovery.ABORT
