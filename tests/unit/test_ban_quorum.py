"""``dht.bans.judge`` as a table: a ban needs two distinct reporter keys, reports are rate-limited per
key, and self-reports or reports of an unknown identity are refused."""

from __future__ import annotations

import pytest

from dht.bans import BAN_QUORUM, REPORTS_PER_HOUR, BanReport, judge


def _r(peer: str, reporter: str) -> BanReport:
    return BanReport(peer_id=peer, stage=0, reason="differs", reporter=reporter)


@pytest.mark.parametrize("rows, banned, refused", [
    # (peer, reporter peer id, reporter key id, seen)
    ([("v", "a", "K1", 0)], {}, []),  # one key holder alone frames nobody
    ([("v", "a", "K1", 0), ("v", "b", "K2", 5)], {"v": ["K1", "K2"]}, []),  # two keys agree
    ([("v", "a", "K1", 0), ("v", "a2", "K1", 5)], {}, []),  # one key behind two peer ids counts once
    ([("v", "a", "K1", 0), ("w", "b", "K2", 5)], {}, []),  # two keys, two different peers
    ([("v", "a", None, 0), ("v", "b", "K2", 5)], {}, ["the reporter's access token does not check out"]),
    ([("a", "a", "K1", 0), ("a", "b", "K2", 5)], {}, ["a reporter cannot report itself"]),
])
def test_judge(rows, banned, refused):
    got = judge([(_r(peer, reporter), key, seen) for peer, reporter, key, seen in rows])
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
