"""The trainer's fault decisions (``trainer.faults``) as tables: one row per rule, what happened in, what
the trainer does out. Rows that must fail say so with the message a person reads."""

from __future__ import annotations

import pytest

from core.config import TrainerSettings
from core.errors import (
    AuthRejected,
    AveragingFailed,
    BadRequest,
    CacheMiss,
    CapacityExceeded,
    InvalidOutput,
    PeerUnavailable,
    StageTimeout,
    StaleReplica,
    WrongStage,
)
from trainer.faults import (
    STALE_RECHECK,
    FaultPolicy,
    OnFailure,
    OnStepFailure,
    Readmission,
    after_call_failure,
    after_probe,
    after_step_failure,
    ban_seconds,
    member_gone,
    run_step_seen,
    step_members,
)

POLICY = FaultPolicy(attempts=6, lone_retries=2, ban_time=60.0)


@pytest.mark.parametrize("why, seconds", [
    (PeerUnavailable("gone"), 60.0),
    (StageTimeout("hung"), 60.0),
    (InvalidOutput("NaN"), 60.0),
    (AveragingFailed("lost a round"), 60.0),
    (StaleReplica("behind"), STALE_RECHECK),  # it resyncs by itself within seconds
])
def test_ban_seconds(why, seconds):
    assert ban_seconds(why, POLICY) == seconds


@pytest.mark.parametrize("error, attempt, tries, alone, dropped, verdict", [
    (PeerUnavailable("no reply"), 1, 0, False, False, OnFailure.RETRY),  # a lost reply: once more
    (PeerUnavailable("no reply"), 2, 1, False, False, OnFailure.DROP),  # twice: gone
    (PeerUnavailable("no reply"), 1, 0, True, False, OnFailure.RETRY),  # the only replica: retried...
    (PeerUnavailable("no reply"), 3, 2, True, False, OnFailure.DROP),  # ...lone_retries times
    (CapacityExceeded("full"), 1, 0, False, False, OnFailure.RETRY),
    (CacheMiss("forgot"), 1, 0, False, False, OnFailure.RETRY),
    (StageTimeout("hung"), 1, 0, False, False, OnFailure.DROP),  # hung past the timeout: at once
    (StageTimeout("hung"), 1, 0, True, False, OnFailure.RETRY),  # unless it is all the stage has
    (StaleReplica("behind"), 1, 0, False, False, OnFailure.DROP),
    (InvalidOutput("NaN"), 1, 0, False, False, OnFailure.DROP),  # it would compute the same again
    (InvalidOutput("NaN"), 1, 0, True, False, OnFailure.DROP),
    (PeerUnavailable("no reply"), 1, 0, False, True, OnFailure.ELSEWHERE),  # another call dropped it
    (InvalidOutput("NaN"), 1, 0, False, True, OnFailure.ELSEWHERE),
    (PeerUnavailable("no reply"), 6, 0, False, False, OnFailure.RAISE),  # the last attempt
    (BadRequest("malformed"), 1, 0, False, False, OnFailure.RAISE),  # our own request is wrong
    (AuthRejected("token expired"), 1, 0, True, True, OnFailure.RAISE),
    (WrongStage("moved on"), 1, 0, False, False, OnFailure.RETRY),  # the peer moved: rerouted like a gone one
])
def test_after_call_failure(error, attempt, tries, alone, dropped, verdict):
    assert after_call_failure(error, attempt=attempt, tries=tries, alone=alone, dropped=dropped,
                              policy=POLICY) is verdict


@pytest.mark.parametrize("run_step, peer_step, others, expected", [
    (None, 3, True, 3),  # the first answer tells the run's step
    (3, 3, True, 3),
    (3, 4, True, 4),  # another trainer closed step 3: the run moved on
    (3, 2, False, 3),  # behind but all the stage has: it computes (and adopts the step at the next one)
    (3, 2, True, "peer 12345678 of stage 1 is at step 2, the run at 3"),
])
def test_run_step_seen(run_step, peer_step, others, expected):
    seen = lambda: run_step_seen(run_step, peer_step, stage=1, peer_id="peer-12345678", others=others)  # noqa: E731
    if isinstance(expected, str):
        with pytest.raises(StaleReplica, match=expected):
            seen()
    else:
        assert seen() == expected


@pytest.mark.parametrize("answer, why, run_step, outcome", [
    (PeerUnavailable("no reply"), PeerUnavailable("gone"), 3, Readmission.BAN_AGAIN),
    (TimeoutError(), AveragingFailed("lost a round"), 3, Readmission.BAN_AGAIN),
    (3, PeerUnavailable("gone"), 3, Readmission.BACK),
    (1, PeerUnavailable("gone"), 3, Readmission.BACK),  # behind: its stage's step probe finds out
    (2, StaleReplica("behind"), 3, Readmission.RECHECK),  # still catching up
    (3, StaleReplica("behind"), 3, Readmission.BACK),
    (2, StaleReplica("behind"), None, Readmission.BACK),  # the run's step is not known yet
])
def test_after_probe(answer, why, run_step, outcome):
    assert after_probe(answer, why, run_step) is outcome


@pytest.mark.parametrize("answer, why, outcome", [
    (2, StaleReplica("behind"), Readmission.BACK),  # behind, but nobody else serves its stage: adopts the run's step
    (PeerUnavailable("no reply"), StaleReplica("behind"), Readmission.BAN_AGAIN),
    (3, StaleReplica("behind"), Readmission.BACK),
])
def test_after_probe_of_a_stages_last_replica(answer, why, outcome):
    assert after_probe(answer, why, 3, alone=True) is outcome


@pytest.mark.parametrize("error, gone", [
    (PeerUnavailable("stream closed"), True),
    (AveragingFailed("lost a round"), False),  # its round failed, not the call
    (StageTimeout("hung"), False),
    (InvalidOutput("NaN"), False),
    (RuntimeError("a bug"), False),
])
def test_member_gone(error, gone):
    assert member_gone(error) is gone


@pytest.mark.parametrize("error, verdict", [
    (AveragingFailed("lost a round"), OnStepFailure.KEEP),  # another member let the group down
    (PeerUnavailable("gone"), OnStepFailure.DROP),
    (StageTimeout("hung"), OnStepFailure.DROP),
    (StaleReplica("behind"), OnStepFailure.DROP),
    (BadRequest("malformed"), OnStepFailure.RAISE),
    (RuntimeError("a bug"), OnStepFailure.RAISE),  # not ours to route around
])
def test_after_step_failure(error, verdict):
    assert after_step_failure(error) is verdict


@pytest.mark.parametrize("live, peer_steps, members", [
    ({"a", "b"}, {}, ["a", "b"]),  # steps not known: every live replica
    ({"a", "b"}, {"a": 5, "b": 4}, ["a"]),  # b missed a step: left out
    ({"a", "b"}, {"a": 6, "b": 5}, ["a", "b"]),  # ahead counts as current
    ({"a", "b"}, {"a": 3, "b": 4}, ["a", "b"]),  # all behind (an old checkpoint): all adopt the run's step
    (set(), {}, []),  # no replica: the caller routes to one
])
def test_step_members(live, peer_steps, members):
    assert step_members(live, peer_steps, 5) == members


def test_policy_defaults_are_the_trainer_settings():
    settings = TrainerSettings()
    assert FaultPolicy() == FaultPolicy.from_settings(settings)
    tuned = FaultPolicy.from_settings(settings.model_copy(update={"ban_time": 5.0, "max_abs_value": 10.0}), attempts=3)
    assert (tuned.ban_time, tuned.max_abs, tuned.attempts) == (5.0, 10.0, 3)
