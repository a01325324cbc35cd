"""Where a peer sits: claiming stages on join and moving later, as pure functions over stage loads.

The swarm is as fast as its *bottleneck*: the minimum over stages of the total throughput serving
that stage. A peer measured at ``compute`` tokens/s for one stage that holds ``k`` consecutive stages
gives each of them ``min(compute / k, network)`` tokens/s (``network``: tokens/s its link carries, the
activations enter and leave a span once whatever its length).

* ``choose_stages`` picks the span that raises the bottleneck the most (ties: the span that lifts the
  least-served stages the most, by ``sum(log(load))``; then the shorter span; then ``rng``), among
  the spans that fit in the peer's memory.
* ``should_move`` lets a serving peer re-run that choice without itself and answers a ``Move`` only
  when the swarm is imbalanced by more than ``margin`` and the move strictly raises the bottleneck (or,
  with the bottleneck tied over several stages, serves one of them). Every move so raises the pair
  ``(bottleneck, -stages at the bottleneck)``, so moves cannot cycle (no flapping).

Loads are numpy arrays of tokens/s per stage; nothing here knows about the network or the DHT.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

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
]

_TIE = 1e-9  # relative tolerance when comparing bottlenecks computed in floating point


@dataclass(frozen=True, order=True)
class Span:
    """``count`` consecutive stages starting at ``start``."""

    start: int
    count: int = 1

    @property
    def stages(self) -> range:
        return range(self.start, self.start + self.count)

    def __str__(self) -> str:
        return f"stage {self.start}" if self.count == 1 else f"stages {self.start}..{self.start + self.count - 1}"


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
    sizes = np.asarray(stage_bytes, dtype=np.float64)
    for count in range(len(sizes), 0, -1):
        if sliding_window_view(sizes, count).sum(axis=1).min() <= memory_bytes:
            return count
    return 1  # unreachable: the smallest single stage fits


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
    max_stages: int | None = None,
) -> Move | None:
    """Whether ``me`` should leave its span for another, given the loads it counts in (``loads``
    includes ``me``'s own contribution). ``None`` means stay."""
    loads = np.asarray(loads, dtype=np.float64)
    before = bottleneck(loads)
    if before > 0 and loads.mean() <= before * (1 + margin):
        return None  # balanced within the margin: a quiet swarm stays put
    without = loads.copy()
    span = me.span
    without[span.start:span.start + span.count] -= contribution(me.compute, span.count, me.network)
    np.maximum(without, 0.0, out=without)
    new = choose_stages(without, stage_bytes, compute=me.compute, memory_bytes=memory_bytes, network=me.network,
                        max_stages=max_stages)
    if new == span:
        return None
    after_loads = without.copy()
    after_loads[new.start:new.start + new.count] += contribution(me.compute, new.count, me.network)
    after = bottleneck(after_loads)
    if not _better(after_loads, after, loads, before):
        return None
    return Move(old=span, new=new, bottleneck_before=before, bottleneck_after=after)


def _better(new: np.ndarray, new_min: float, old: np.ndarray, old_min: float) -> bool:
    """``(bottleneck, -stages at it)`` strictly rises: the potential that rules out cycles."""
    tolerance = _TIE * max(old_min, 1.0)
    if new_min > old_min + tolerance:
        return True
    if new_min < old_min - tolerance:
        return False
    return int(np.sum(new <= new_min + tolerance)) < int(np.sum(old <= old_min + tolerance))


def _score_spans(loads: np.ndarray, sizes: np.ndarray, compute: float, network: float, memory: float,
                 longest: int) -> np.ndarray:
    """Rows ``(new bottleneck, utility gain, count, start)``, one per span that fits."""
    n = len(loads)
    prefix = np.concatenate([[np.inf], np.minimum.accumulate(loads)])  # prefix[a] = min(loads[:a])
    suffix = np.concatenate([np.minimum.accumulate(loads[::-1])[::-1], [np.inf]])  # suffix[j] = min(loads[j:])
    floor = max(compute, 1.0) * 1e-6  # an empty stage weighs log(floor): filling it gains a lot
    utility = np.log(loads + floor)
    rows = []
    for count in range(1, longest + 1):
        share = contribution(compute, count, network)
        starts = np.arange(n - count + 1)
        inside = sliding_window_view(loads, count).min(axis=1) + share
        outside = np.minimum(prefix[starts], suffix[starts + count])
        gain = sliding_window_view(np.log(loads + share + floor) - utility, count).sum(axis=1)
        fits = sliding_window_view(sizes, count).sum(axis=1) <= memory
        block = np.stack([np.minimum(inside, outside), gain, np.full(len(starts), count), starts], axis=1)
        rows.append(block[fits])
    return np.concatenate(rows)


def _pick(scored: np.ndarray, rng: random.Random | None) -> Span:
    """Highest bottleneck, then highest utility gain, then the shortest span, then ``rng`` (or the
    lowest start)."""
    for column, sign in ((0, 1.0), (1, 1.0), (2, -1.0)):
        values = sign * scored[:, column]
        best = values.max()
        scored = scored[values >= best - _TIE * max(abs(best), 1.0)]
    starts = sorted(int(s) for s in scored[:, 3])
    start = rng.choice(starts) if rng is not None else starts[0]
    return Span(start=start, count=int(scored[0, 2]))
