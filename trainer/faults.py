"""What the trainer does when a stage call or a step call fails: its bounds (``FaultPolicy``) and its
decisions, as pure functions of what happened, so each rule is one row of a table test.

The pipeline's parts (``trainer.replicas``, ``trainer.commit``, ``trainer.pipeline``) do the calls, the
bans and the replays; what to do after each outcome is decided here."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any, Collection, Mapping

from core.config import TrainerSettings
from core.errors import (
    AveragingFailed,
    InvalidOutput,
    PeerUnavailable,
    Recovery,
    StageTimeout,
    StaleReplica,
    SwarmError,
    recovery_for,
)
from core.types import PeerId, StageIndex

__all__ = [
    "FaultPolicy",
    "POLICY_SETTINGS",
    "EARLY_PROBE",
    "STALE_RECHECK",
    "ban_seconds",
    "OnFailure",
    "after_call_failure",
    "run_step_seen",
    "Readmission",
    "after_probe",
    "member_gone",
    "OnStepFailure",
    "after_step_failure",
    "step_members",
]

EARLY_PROBE = 5.0  # seconds between probes of a banned replica whose stage nobody else serves
STALE_RECHECK = 2.0  # seconds before a replica left out for being behind is asked its step again


def _setting(name: str) -> Any:
    """A ``TrainerSettings`` default: the one place a trainer's bound is written down."""
    return TrainerSettings.model_fields[name].default


@dataclass(frozen=True)
class FaultPolicy:
    """How hard the trainer tries before it gives up on a call (all bounded). The bounds a run's
    config sets (``TrainerSettings``) default to that config's defaults; ``from_settings`` takes them
    from a config."""

    attempts: int = 6  # calls of one stage for one request, over all replicas
    lone_retries: int = 2  # retries of a stage's only replica before it is presumed dead
    backoff: float = 0.25  # seconds before retrying the only replica of a stage (doubles each time)
    ban_time: float = _setting("ban_time")  # seconds a failed peer is left out; then it must answer a probe
    probe_timeout: float = 5.0  # seconds a dropped peer whose ban ended has to answer ``info`` to come back
    step_attempts: int = 4  # rounds of applying one collaborative step
    averaging_window: float = _setting("averaging_window")  # seconds from a step's request to the averaging round
    step_wait: float = _setting("step_wait")  # seconds to wait for other trainers to finish a step
    spot_check_rate: float = _setting("spot_check_rate")  # training forwards recomputed elsewhere (trainer.spotcheck)
    spot_check_tolerance: float | None = _setting("spot_check_tolerance")  # None: by dtype (spotcheck.TOLERANCE)
    max_abs: float = _setting("max_abs_value")  # a stage output or gradient beyond this (or NaN/inf) is InvalidOutput

    @classmethod
    def from_settings(cls, settings: TrainerSettings, **bounds: Any) -> "FaultPolicy":
        """The policy of a trainer configured by ``settings``; ``bounds``: the fields no config sets."""
        return cls(**{field: getattr(settings, name) for field, name in POLICY_SETTINGS.items()}, **bounds)


POLICY_SETTINGS: Mapping[str, str] = MappingProxyType({
    "ban_time": "ban_time", "averaging_window": "averaging_window", "step_wait": "step_wait",
    "spot_check_rate": "spot_check_rate", "spot_check_tolerance": "spot_check_tolerance", "max_abs": "max_abs_value",
})
"""``FaultPolicy`` field -> the ``TrainerSettings`` field it is configured by."""


def ban_seconds(why: BaseException, policy: FaultPolicy) -> float:
    """How long a peer dropped for ``why`` stays out before it is probed. One left out only for being
    behind (``StaleReplica``) takes the current state by itself within seconds (``peers.state.resync``), and
    left out for a whole ban it fell behind again at every step it missed."""
    return STALE_RECHECK if isinstance(why, StaleReplica) else policy.ban_time


class OnFailure(Enum):
    """What a call of a stage does after its peer failed."""

    RAISE = "raise"  # the error is the caller's: a malformed request, or the last attempt
    ELSEWHERE = "elsewhere"  # another call dropped the peer meanwhile: go on with another replica
    RETRY = "retry"  # the same peer again (a lost reply is likelier than a dead peer)
    DROP = "drop"  # ban the peer, replay what it held, go on with another replica


def after_call_failure(error: SwarmError, *, attempt: int, tries: int, alone: bool, dropped: bool,
                       policy: FaultPolicy) -> OnFailure:
    """The decision after attempt ``attempt`` (from 1) failed with ``error``, the peer having been
    retried ``tries`` times already; ``alone``: it is its stage's only replica; ``dropped``: another
    call has banned it since. A peer that did not answer is tried once more, the only replica of a
    stage ``lone_retries`` times; one that hung past the timeout or was behind goes at once, and one
    that returned an invalid output is never retried (it would compute the same again)."""
    if recovery_for(error) is Recovery.ABORT or attempt >= policy.attempts:
        return OnFailure.RAISE
    if isinstance(error, InvalidOutput):
        retries = 0
    elif alone:
        retries = policy.lone_retries
    else:
        retries = int(not isinstance(error, (StageTimeout, StaleReplica)))
    if dropped:
        return OnFailure.ELSEWHERE
    return OnFailure.RETRY if tries < retries else OnFailure.DROP


def run_step_seen(run_step: int | None, peer_step: int, *, stage: StageIndex, peer_id: PeerId, others: bool) -> int:
    """The run's step after a replica of ``stage`` answered at ``peer_step``. One ahead means another
    trainer closed the step (the run moves on to it); one behind missed a step and must not compute
    for us (``StaleReplica``) unless it is all the stage has (``others`` False)."""
    if run_step is None or peer_step > run_step:
        return peer_step
    if peer_step < run_step and others:
        raise StaleReplica(f"peer {peer_id[-8:]} of stage {stage} is at step {peer_step}, the run at {run_step}")
    return run_step


class Readmission(Enum):
    """What becomes of a dropped peer after a probe (``info``) whose ban ended or was cut short."""

    BAN_AGAIN = "ban again"  # no answer: its record outlives it in the DHT; out for another ban
    RECHECK = "recheck"  # left out for being behind and still behind: asked again shortly
    BACK = "back"  # it answers: back in routes and steps


def after_probe(answer: BaseException | int, why: BaseException | None, run_step: int | None, *,
                alone: bool = False) -> Readmission:
    """``answer``: the probe's error, or the optimizer step the peer answered at; ``why``: what it was
    dropped for; ``alone``: nobody else serves its stage. Behind and alone, it is back and adopts the
    run's step as a lone replica does (``step_members``): nothing else would ever bring it to the run's
    step once the replicas ahead of it are gone, and the run would wait for its stage forever."""
    if isinstance(answer, BaseException):
        return Readmission.BAN_AGAIN
    if isinstance(why, StaleReplica) and run_step is not None and answer < run_step and not alone:
        return Readmission.RECHECK
    return Readmission.BACK


def member_gone(error: BaseException) -> bool:
    """A step call that failed as a call (the member is gone, or its reply was lost), not in its
    averaging round nor by outliving the timeout: the other members need not wait for it, and it may
    still have applied the step (it is asked before it is dropped)."""
    return isinstance(error, PeerUnavailable) and not isinstance(error, (AveragingFailed, StageTimeout))


class OnStepFailure(Enum):
    """What applying a step does about a member whose step call failed (and that is not ahead)."""

    KEEP = "keep"  # its averaging round failed: another member let the group down, not this one
    RAISE = "raise"  # a malformed request, or no swarm error at all: the caller's
    DROP = "drop"  # ban it and replay what it held on the stage's other replicas


def after_step_failure(error: BaseException) -> OnStepFailure:
    if isinstance(error, AveragingFailed):
        return OnStepFailure.KEEP
    if not isinstance(error, SwarmError) or recovery_for(error) is Recovery.ABORT:
        return OnStepFailure.RAISE
    return OnStepFailure.DROP


def step_members(live: Collection[str], peer_steps: Mapping[str, int], step: int) -> list[str]:
    """The replicas that take part in ``step``: every live one minus those known to be behind,
    unless nobody else is left (a stage restored from an old checkpoint adopts the run's step).
    Empty: the stage has no live replica (the caller routes to one)."""
    current = {p for p in live if peer_steps.get(p, step) >= step}
    return sorted(current or live)
