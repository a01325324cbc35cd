"""Per-caller limits decided from a stream's opening and its frame headers (``net.admission``)."""

from __future__ import annotations

import pytest

from net.admission import CallerLimits, Refusals, bytes_refusal, refusal_hold, stream_refusal
from core.errors import CapacityExceeded

MiB = 1 << 20


@pytest.mark.parametrize("open_streams, max_streams, refused", [
    (0, 64, False),
    (63, 64, False),
    (64, 64, True),
    (500, 64, True),
    (0, 0, True),
])
def test_stream_refusal_table(open_streams, max_streams, refused):
    why = stream_refusal(open_streams, max_streams)
    assert (why is not None) == refused
    if refused:
        assert f"{open_streams} streams open" in why and f"at most {max_streams}" in why


@pytest.mark.parametrize("in_flight, more, method_limit, max_bytes, refused", [
    (0, 10 * MiB, 1024 * MiB, 1024 * MiB, False),         # within the caller's budget
    (1000 * MiB, 24 * MiB, 1024 * MiB, 1024 * MiB, False),  # exactly at it
    (1000 * MiB, 25 * MiB, 1024 * MiB, 1024 * MiB, True),   # the 40 x 25 MiB probe's 41st
    (0, 5000 * MiB, None, 1024 * MiB, False),              # one big checkpoint upload, alone
    (0, 5000 * MiB, 4000 * MiB, 1024 * MiB, True),         # ... but not past its own method's limit
    (1 * MiB, 5000 * MiB, None, 1024 * MiB, True),         # ... and not beside other requests
])
def test_bytes_refusal_table(in_flight, more, method_limit, max_bytes, refused):
    why = bytes_refusal(in_flight, more, method_limit, max_bytes)
    assert (why is not None) == refused
    if refused:
        assert f"at most {max_bytes >> 20} MiB" in why


def test_tickets_reserve_and_give_back():
    limits = CallerLimits(max_streams=2, max_bytes=100)
    first, second = limits.open("a", 1000), limits.open("a", 1000)
    with pytest.raises(CapacityExceeded, match="2 streams open"):
        limits.open("a", 1000)
    limits.open("b", 1000).close()  # another caller has limits of its own
    first.reserve(60)
    with pytest.raises(CapacityExceeded, match="would reach"):
        second.reserve(50)
    second.reserve(40)
    assert limits.in_flight["a"] == 100
    first.close()
    first.close()  # idempotent
    assert limits.in_flight["a"] == 40 and limits.streams["a"] == 1
    second.reserve(500)  # alone now: up to its method's limit
    with second:
        pass
    assert not limits.in_flight and not limits.streams


@pytest.mark.parametrize("recent, free, hold, expected", [
    (0, 3, 2.0, 0.0),   # a lapsed token: told at once
    (2, 3, 2.0, 0.0),   # ... and a race or two with its presentation
    (3, 3, 2.0, 2.0),   # refused again and again: held
    (400, 3, 2.0, 2.0),  # a flood: held, never longer (its streams stay capped)
    (0, 0, 1.5, 1.5),
])
def test_refusal_hold_table(recent, free, hold, expected):
    assert refusal_hold(recent, free, hold) == expected


def test_refusals_count_per_caller_within_the_window():
    refusals = Refusals(window=10.0, free=2, seconds=2.0)
    assert [refusals.hold("a", t) for t in (0.0, 1.0, 2.0, 3.0)] == [0.0, 0.0, 2.0, 2.0]
    assert refusals.hold("b", 3.0) == 0.0  # another caller starts afresh
    assert refusals.hold("a", 12.5) == 0.0  # only 3.0 is left in a's window: under the free two
    assert refusals.hold("a", 12.6) == 2.0


def test_refusals_forget_callers_gone_quiet():
    refusals = Refusals(window=10.0)
    for i in range(1100):
        refusals.hold(f"stranger-{i}", 0.0)
    refusals.hold("late", 20.0)
    assert list(refusals.recent) == ["late"]
