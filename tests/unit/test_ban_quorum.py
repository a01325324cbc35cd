"""``dht.bans.judge`` as a table: a ban needs two distinct reporter keys for the same stage, reports are
rate-limited per key, and self-reports, reports of an unknown identity and reports whose evidence is
missing or contradicts itself are refused."""

from __future__ import annotations

import pytest

from dht.bans import BAN_QUORUM, REPORTS_PER_HOUR, judge
from dht.schemas import BanEvidence, BanReport
from core.types import LayerRange

H, A, T, I = "a" * 64, "b" * 64, "c" * 64, "d" * 64  # honest, accused and third outputs' digests, inputs'


def _evidence(stage: int = 0, **changes) -> BanEvidence:
    fields = dict(stage=stage, layers=LayerRange(start=0, end=2), step=3, inputs=I, accused_output=A,
                  honest_output=H, third_output=H, honest_peer="h", third_peer="t", max_abs_diff=0.5)
    return BanEvidence(**(fields | changes))


def _r(peer: str, reporter: str, stage: int = 0, evidence: BanEvidence | None | str = "ok") -> BanReport:
    evidence = _evidence(stage) if evidence == "ok" else evidence
    return BanReport(peer_id=peer, stage=stage, reason="differs", reporter=reporter, evidence=evidence)


def _second(**changes) -> tuple:  # a second key's report of v whose evidence has ``changes``
    return ("v", "b", "K2", 5, 0, _evidence(**changes))


@pytest.mark.parametrize("rows, banned, refused", [
    # (peer, reporter peer id, reporter key id, seen[, stage[, evidence]])
    ([("v", "a", "K1", 0)], {}, []),  # one key holder alone frames nobody
    ([("v", "a", "K1", 0), ("v", "b", "K2", 5)], {"v": ["K1", "K2"]}, []),  # two keys agree
    ([("v", "a", "K1", 0), ("v", "a2", "K1", 5)], {}, []),  # one key behind two peer ids counts once
    ([("v", "a", "K1", 0), ("w", "b", "K2", 5)], {}, []),  # two keys, two different peers
    ([("v", "a", "K1", 0, 0), ("v", "b", "K2", 5, 1)], {}, []),  # two keys, the same peer, other stages
    ([("v", "a", None, 0), ("v", "b", "K2", 5)], {}, ["the reporter's access token does not check out"]),
    ([("a", "a", "K1", 0), ("a", "b", "K2", 5)], {}, ["a reporter cannot report itself"]),
    # the evidence: missing or self-contradictory reports are refused and do not count to the quorum
    ([("v", "a", "K1", 0), ("v", "b", "K2", 5, 0, None)], {}, ["the report carries no evidence"]),
    ([("v", "a", "K1", 0), _second(stage=1)], {}, ["the evidence is of stage 1, the report of stage 0"]),
    ([("v", "a", "K1", 0), _second(honest_peer="v")], {}, ["the accused is named as a witness"]),
    ([("v", "a", "K1", 0), _second(third_peer="v")], {}, ["the accused is named as a witness"]),
    ([("v", "a", "K1", 0), _second(third_peer="h")], {}, ["the honest and the third replica are the same peer"]),
    ([("v", "a", "K1", 0), _second(accused_output=H)], {}, ["the accused's output is the honest one's"]),
    ([("v", "a", "K1", 0), _second(max_abs_diff=0.0)], {}, ["the accused's output is the honest one's"]),
    ([("v", "a", "K1", 0), _second(third_output=A, third_gap=0.5)], {},
     ["the third replica does not side with the honest one"]),
    # on other hardware the third differs from the honest one in the last bits: closer than the accused
    ([("v", "a", "K1", 0), _second(third_output=T, third_gap=1e-6)], {"v": ["K1", "K2"]}, []),
])
def test_judge(rows, banned, refused):
    reports = [(_r(peer, reporter, *rest), key, seen) for peer, reporter, key, seen, *rest in rows]
    got = judge(reports)
    assert got.banned == banned
    assert [why for _, why in got.refused] == refused


@pytest.mark.parametrize("served, banned, refused", [
    (None, {"v": ["K1", "K2"]}, []),  # where judge runs without the stage records: not checked
    ({"v": {0, 1}}, {"v": ["K1", "K2"]}, []),
    ({"w": {1}}, {"v": ["K1", "K2"]}, []),  # the accused's records were never seen: not checked
    ({"v": {1}}, {}, ["the accused served no stage 0 as far as its records show"] * 2),
])
def test_judge_checks_the_stage_against_the_accused_records_where_known(served, banned, refused):
    got = judge([(_r("v", "a"), "K1", 0.0), (_r("v", "b"), "K2", 5.0)], served=served)
    assert got.banned == banned
    assert [why for _, why in got.refused] == refused


def test_reports_beyond_the_rate_limit_are_refused_and_do_not_count():
    flood = [(_r(f"p{i}", "a"), "K1", float(i)) for i in range(REPORTS_PER_HOUR + 2)]
    second = [(_r(f"p{REPORTS_PER_HOUR + 1}", "b"), "K2", 0.0)]
    got = judge(flood + second)
    assert [r.peer_id for r, _ in got.refused] == [f"p{REPORTS_PER_HOUR}", f"p{REPORTS_PER_HOUR + 1}"]
    assert all("more than 10 reports in 1 h from key K1" == why for _, why in got.refused)
    assert got.banned == {}  # p11's K1 report was over the limit: K2 alone is no quorum
    later = judge(flood[:REPORTS_PER_HOUR] + [(_r("q", "a"), "K1", 3600.0 + 1), (_r("q", "b"), "K2", 0.0)])
    assert later.refused == [] and later.banned == {"q": ["K1", "K2"]}  # an hour on, K1 may report again
    assert BAN_QUORUM == 2


def test_evidence_is_refused_when_it_is_not_digests():
    with pytest.raises(ValueError):
        _evidence(inputs="not a digest")
