"""Where a peer sits: claiming stages on join and moving later, as pure functions over stage loads.

The swarm is as fast as its *bottleneck*: the minimum over stages of the total throughput serving
that stage. A peer measured at ``compute`` tokens/s for one stage that holds ``k`` consecutive stages
gives each of them ``min(compute / k, network)`` tokens/s (``network``: tokens/s its link carries, the
activations enter and leave a span once whatever its length).

* ``choose_stages`` picks the span that raises the bottleneck the most (ties: the span that lifts the
  least-served stages the most, by ``sum(log(load))``; then the shorter span; then ``rng``), among
  the spans that fit in the peer's memory.
* ``should_move`` lets a serving peer re-run that choice without itself and answers a ``Move`` only
  when the swarm is out of balance (``rebalancing_needed``: past ``margin`` to start, with hysteresis)
  and the move raises the bottleneck by at least ``MIN_EFFICIENCY`` of what the mover brings and by
  ``MIN_GAIN`` of itself (or, with the bottleneck tied over several stages, serves one of them).
  Every move so raises the pair ``(bottleneck, -stages at the bottleneck)``: moves cannot cycle.

Loads are numpy arrays of tokens/s per stage; nothing here knows about the network or the DHT.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from swarm.errors import InsufficientMemory

__all__ = [
    "Span",
    "PlacedPeer",
    "Move",
    "contribution",
    "stage_loads",
    "bottleneck",
    "spans_that_fit",
    "choose_stages",
    "should_move",
    "rebalancing_needed",
    "SETTLE",
    "MIN_EFFICIENCY",
    "MIN_GAIN",
]

SETTLE = 0.2  # fraction of the margin under which an ongoing rebalancing stops
MIN_EFFICIENCY = 0.5  # share of a mover's throughput that must raise the bottleneck
MIN_GAIN = 0.002  # and the least relative rise of the bottleneck a move is worth
_TIE = 1e-9  # relative tolerance when comparing bottlenecks computed in floating point


@dataclass(frozen=True, order=True)
class Span:
    """``count`` consecutive stages starting at ``start``."""

    start: int
    count: int = 1

    @property
    def stages(self) -> range:
        return range(self.start, self.start + self.count)

    @property
    def end(self) -> int:
        """The last stage of the span (inclusive)."""
        return self.start + self.count - 1

    def __str__(self) -> str:
        return f"stage {self.start}" if self.count == 1 else f"stages {self.start}..{self.end}"

    @classmethod
    def parse(cls, text: str | int) -> "Span":
        """``"2"`` (or ``2``) is stage 2, ``"2-3"`` stages 2 and 3 (how ``--stage`` pins a span)."""
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
        if match is None:
            raise ValueError(f"{text!r} is not a stage or a range of stages like 2 or 2-3")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise ValueError(f"{text!r}: the range ends before it starts")
        return cls(first, last - first + 1)


@dataclass(frozen=True)
class PlacedPeer:
    """A peer as placement sees it: its speeds and the span it holds."""

    peer_id: str
    compute: float
    span: Span
    network: float = math.inf


@dataclass(frozen=True)
class Move:
    """A decision to leave ``old`` for ``new``; ``bottleneck_*`` are tokens/s before and after."""

    old: Span
    new: Span
    bottleneck_before: float
    bottleneck_after: float

    @property
    def gain(self) -> float:
        """Relative rise of the bottleneck (infinite when it fills an empty stage)."""
        if self.bottleneck_before <= 0:
            return math.inf if self.bottleneck_after > 0 else 0.0
        return self.bottleneck_after / self.bottleneck_before - 1


def contribution(compute: float, count: int, network: float = math.inf) -> float:
    """Tokens/s a peer gives each of the ``count`` stages it holds."""
    return min(compute / count, network)


def stage_loads(num_stages: int, peers: Iterable[PlacedPeer]) -> np.ndarray:
    """Total throughput serving each stage (tokens/s)."""
    loads = np.zeros(num_stages)
    for peer in peers:
        span = peer.span
        loads[span.start:span.start + span.count] += contribution(peer.compute, span.count, peer.network)
    return loads


def bottleneck(loads: Sequence[float] | np.ndarray) -> float:
    return float(np.min(loads))


def spans_that_fit(stage_bytes: Sequence[int], memory_bytes: int) -> int:
    """How many consecutive stages the largest window of this memory can hold (at least 1), or
    ``InsufficientMemory`` naming what one stage needs."""
    needed = min(stage_bytes)
    if memory_bytes < needed:
        raise InsufficientMemory(
            f"one stage needs {needed / 2**30:.2f} GiB (parameters, gradients and AdamW state) but this "
            f"peer has {memory_bytes / 2**30:.2f} GiB free: use a machine with more memory, or a run with "
            "more stages"
        )
    sums = np.concatenate([[0.0], np.cumsum(np.asarray(stage_bytes, dtype=np.float64))])
    low, high = 1, len(stage_bytes)  # the lightest window of ``count`` stages grows with ``count``
    while low < high:
        mid = (low + high + 1) // 2
        if (sums[mid:] - sums[:-mid]).min() <= memory_bytes:
            low = mid
        else:
            high = mid - 1
    return low


def choose_stages(
    loads: Sequence[float] | np.ndarray,
    stage_bytes: Sequence[int],
    *,
    compute: float,
    memory_bytes: int,
    network: float = math.inf,
    max_stages: int | None = None,
    rng: random.Random | None = None,
) -> Span:
    """The span (one or more consecutive stages, fitting in ``memory_bytes``) whose new load raises
    the bottleneck the most. Raises ``InsufficientMemory`` when not even one stage fits."""
    loads = np.asarray(loads, dtype=np.float64)
    if len(loads) == 0 or len(loads) != len(stage_bytes):
        raise ValueError(f"need one load and one size per stage, got {len(loads)} and {len(stage_bytes)}")
    if compute <= 0:
        raise ValueError(f"a peer's throughput must be positive, got {compute}")
    longest = min(spans_that_fit(stage_bytes, memory_bytes), max_stages or len(loads))
    candidates = _score_spans(loads, np.asarray(stage_bytes, dtype=np.float64), compute, network, memory_bytes,
                              longest)
    return _pick(candidates, rng)


def should_move(
    loads: Sequence[float] | np.ndarray,
    stage_bytes: Sequence[int],
    me: PlacedPeer,
    *,
    memory_bytes: int,
    margin: float = 0.15,
    active: bool = False,
    max_stages: int | None = None,
) -> Move | None:
    """Whether ``me`` should leave its span for another, given the loads it counts in (``loads``
    includes ``me``'s own contribution). ``None`` means stay. ``active`` is the caller's
    ``rebalancing_needed`` state (hysteresis: see there)."""
    loads = np.asarray(loads, dtype=np.float64)
    before = bottleneck(loads)
    if not rebalancing_needed(loads, margin, active):
        return None  # balanced within the margin: a quiet swarm stays put
    without = loads.copy()
    span = me.span
    without[span.start:span.start + span.count] -= contribution(me.compute, span.count, me.network)
    np.maximum(without, 0.0, out=without)
    if _cannot_gain(loads, without, before, me, stage_bytes, memory_bytes, max_stages):
        return None
    new = choose_stages(without, stage_bytes, compute=me.compute, memory_bytes=memory_bytes, network=me.network,
                        max_stages=max_stages)
    if new == span:
        return None
    after_loads = without.copy()
    after_loads[new.start:new.start + new.count] += contribution(me.compute, new.count, me.network)
    after = bottleneck(after_loads)
    share = contribution(me.compute, new.count, me.network)
    if not _better(after_loads, after, loads, before, min_rise=max(MIN_EFFICIENCY * share, MIN_GAIN * before)):
        return None
    return Move(old=span, new=new, bottleneck_before=before, bottleneck_after=after)


def rebalancing_needed(loads: Sequence[float] | np.ndarray, margin: float, active: bool = False) -> bool:
    """Hysteresis on the swarm's imbalance, ``mean load / bottleneck`` (1 when perfectly even): it
    starts when the imbalance passes ``1 + margin`` and goes on, once started, until it is back under
    ``1 + margin * SETTLE``. A swarm a little out of balance stays put; one that started to move
    finishes the job instead of stopping just under the margin. A stage nobody serves always counts."""
    loads = np.asarray(loads, dtype=np.float64)
    low = bottleneck(loads)
    if low <= 0:
        return True
    return loads.mean() > low * (1 + (margin * SETTLE if active else margin))


def _cannot_gain(loads: np.ndarray, without: np.ndarray, before: float, me: PlacedPeer,
                 stage_bytes: Sequence[int], memory_bytes: int, max_stages: int | None) -> bool:
    """A cheap exact ``no``. A span of at most ``m`` stages leaves one of the ``m + 1`` least-served
    stages as it is, so the bottleneck cannot rise above that stage; a move must raise it by at least
    ``MIN_EFFICIENCY`` of the smallest share this peer could bring and ``MIN_GAIN``; with a single
    stage at the bottleneck there is no tie to break either. Most peers of a settled swarm stop here."""
    longest = min(spans_that_fit(stage_bytes, memory_bytes), max_stages or len(loads))
    if longest >= len(loads) or before <= 0:
        return False
    tolerance = _TIE * max(before, 1.0)
    if int(np.sum(loads <= before + tolerance)) > 1:
        return False
    least_share = contribution(me.compute, longest, me.network)
    needed = max(MIN_EFFICIENCY * least_share, MIN_GAIN * before)
    return float(np.partition(without, longest)[longest]) < before + needed - tolerance


def _better(new: np.ndarray, new_min: float, old: np.ndarray, old_min: float, *, min_rise: float) -> bool:
    """``(bottleneck, -stages at it)`` strictly rises: the potential that rules out cycles. A rising
    bottleneck must rise by ``min_rise`` (tokens/s): a move costs a reload, so most of what the mover
    brings must reach the bottleneck, not pile up above it."""
    tolerance = _TIE * max(old_min, 1.0)
    if new_min > old_min + tolerance:
        return new_min - old_min >= min_rise - tolerance or old_min <= 0
    if new_min < old_min - tolerance:
        return False
    return int(np.sum(new <= new_min + tolerance)) < int(np.sum(old <= old_min + tolerance))


def _score_spans(loads: np.ndarray, sizes: np.ndarray, compute: float, network: float, memory: float,
                 longest: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """New bottleneck, utility gain and whether it fits, of every span on a count x start grid (row
    ``k`` holds spans of ``k + 1`` stages)."""
    n = len(loads)
    counts, starts = np.arange(1, longest + 1), np.arange(n)
    ends = starts[None, :] + counts[:, None]  # exclusive end of each span
    valid = ends <= n
    ends = np.minimum(ends, n)
    shares = np.minimum(compute / counts, network)
    window_min = _window_minima(loads, counts, starts, ends)
    prefix = np.concatenate([[np.inf], np.minimum.accumulate(loads)])  # prefix[a] = min(loads[:a])
    suffix = np.concatenate([np.minimum.accumulate(loads[::-1])[::-1], [np.inf]])  # suffix[j] = min(loads[j:])
    new_min = np.minimum(window_min + shares[:, None], np.minimum(prefix[starts][None, :], suffix[ends]))
    floor = max(compute, 1.0) * 1e-6  # an empty stage weighs log(floor): filling it gains a lot
    lifted = np.log(loads[None, :] + shares[:, None] + floor) - np.log(loads + floor)[None, :]
    lifted_sums = np.concatenate([np.zeros((longest, 1)), np.cumsum(lifted, axis=1)], axis=1)
    rows = np.arange(longest)[:, None]
    gain = lifted_sums[rows, ends] - lifted_sums[rows, starts[None, :]]
    size_sums = np.concatenate([[0.0], np.cumsum(sizes)])
    fits = valid & (size_sums[ends] - size_sums[starts][None, :] <= memory)
    return new_min, gain, fits


def _window_minima(loads: np.ndarray, counts: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """``min(loads[start:end])`` on the count x start grid, from a sparse table of power-of-two windows
    (two overlapping windows cover any span): a few array operations instead of one per count."""
    n = len(loads)
    table = [np.concatenate([loads, np.full(n, np.inf)])]
    while 2 ** len(table) <= counts[-1]:
        half = 2 ** (len(table) - 1)
        previous = table[-1]
        table.append(np.minimum(previous, np.concatenate([previous[half:], np.full(half, np.inf)])))
    table = np.stack(table)
    level = np.floor(np.log2(counts)).astype(np.int64)[:, None]
    second = np.maximum(ends - 2 ** level, 0)
    return np.minimum(table[level, starts[None, :]], table[level, second])


def _pick(scored: tuple[np.ndarray, np.ndarray, np.ndarray], rng: random.Random | None) -> Span:
    """Highest bottleneck, then highest utility gain, then the shortest span, then ``rng`` (or the
    lowest start)."""
    new_min, gain, fits = scored
    new_min = np.where(fits, new_min, -np.inf)
    best = new_min.max()
    chosen = new_min >= best - _TIE * max(abs(best), 1.0)
    gain = np.where(chosen, gain, -np.inf)
    best_gain = gain.max()
    chosen &= gain >= best_gain - _TIE * max(abs(best_gain), 1.0)
    row = int(np.argmax(chosen.any(axis=1)))
    starts = [int(s) for s in np.flatnonzero(chosen[row])]
    start = rng.choice(starts) if rng is not None else starts[0]
    return Span(start=start, count=row + 1)
