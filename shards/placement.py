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

* A replica is not free in training: every step, the replicas of a stage sum their gradients in one
  averaging round (``ReplicaCost``). With a cost, placement compares *effective* loads (tokens a step
  trains over the step's compute plus that round), so two peers split a two-stage pipeline instead of
  both holding the whole model, and among plans within ``REDUNDANCY_SLACK`` of the best it keeps more
  stages with a second replica (a stage with one replica loses its steps since the last checkpoint
  with that peer). ``plan_joiners`` places peers that join at the same moment as one group (claim,
  then verify: each runs the same pure function on what it sees), and ``should_move`` also offers a
  *shrink* (dropping stages of its own span, nothing to load) whenever it raises the bottleneck.

Loads are numpy arrays of tokens/s per stage; nothing here knows about the network or the DHT.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from core.errors import InsufficientMemory
from core.types import PeerId

__all__ = [
    "Span",
    "PlacedPeer",
    "Move",
    "ReplicaCost",
    "Joiner",
    "contribution",
    "effective_loads",
    "plan_joiners",
    "stage_loads",
    "bottleneck",
    "spans_that_fit",
    "choose_stages",
    "should_move",
    "rebalancing_needed",
    "SETTLE",
    "MIN_EFFICIENCY",
    "MIN_GAIN",
    "REDUNDANCY_SLACK",
]

SETTLE = 0.2  # fraction of the margin under which an ongoing rebalancing stops
MIN_EFFICIENCY = 0.5  # share of a mover's throughput that must raise the bottleneck
MIN_GAIN = 0.002  # and the least relative rise of the bottleneck a move is worth
REDUNDANCY_SLACK = 0.1  # a plan this much slower than the best still wins if more stages keep a spare replica
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

    peer_id: PeerId
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


@dataclass(frozen=True)
class ReplicaCost:
    """What a replica costs its stage in training. Each step the ``r > 1`` replicas of a stage sum their
    gradients in one averaging round: ``round_seconds`` for every other member (a member opens a stream
    to each other member and reduces its part of their tensors, and matchmaking waits for all of
    them) plus ``2 (r - 1) / r`` of the stage's ``param_bytes`` each way over the slowest link
    (``bandwidth``, bytes/s; an all-reduce's traffic per member). A step trains ``step_tokens``
    tokens, so a stage with load ``L`` over ``r`` replicas trains
    ``step_tokens / (step_tokens / L + averaging)`` tokens/s."""

    step_tokens: float
    round_seconds: float
    param_bytes: tuple[float, ...]
    bandwidth: float = math.inf

    def averaging_seconds(self, replicas: np.ndarray) -> np.ndarray:
        replicas = np.asarray(replicas, dtype=np.float64)
        traffic = 2 * (replicas - 1) / np.maximum(replicas, 1) * np.asarray(self.param_bytes) / self.bandwidth
        return np.where(replicas > 1, self.round_seconds * (replicas - 1) + traffic, 0.0)


@dataclass(frozen=True)
class Joiner:
    """A peer placed by ``plan_joiners``: its speeds (tokens/s for one stage; what its link carries)
    and the memory it can give to stages."""

    peer_id: PeerId
    compute: float
    memory_bytes: int
    network: float = math.inf


def effective_loads(loads: Sequence[float] | np.ndarray, replicas: Sequence[int] | np.ndarray | None,
                    cost: ReplicaCost | None) -> np.ndarray:
    """Tokens/s each stage trains once its replicas' averaging is paid (``loads`` itself without a cost)."""
    loads = np.asarray(loads, dtype=np.float64)
    if cost is None or replicas is None:
        return loads
    seconds = cost.step_tokens / np.maximum(loads, 1e-300) + cost.averaging_seconds(np.asarray(replicas))
    return np.where(loads > 0, cost.step_tokens / seconds, 0.0)


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
    replicas: Sequence[int] | np.ndarray | None = None,
    cost: ReplicaCost | None = None,
) -> Span:
    """The span (one or more consecutive stages, fitting in ``memory_bytes``) whose new load raises
    the bottleneck the most. With ``cost`` (and each stage's ``replicas``), the bottleneck is of the
    effective loads, and a span within ``REDUNDANCY_SLACK`` of the best that leaves fewer stages with a
    single replica wins. Raises ``InsufficientMemory`` when not even one stage fits."""
    loads = np.asarray(loads, dtype=np.float64)
    if len(loads) == 0 or len(loads) != len(stage_bytes):
        raise ValueError(f"need one load and one size per stage, got {len(loads)} and {len(stage_bytes)}")
    if compute <= 0:
        raise ValueError(f"a peer's throughput must be positive, got {compute}")
    replicas = _replicas(loads, replicas)
    longest = min(spans_that_fit(stage_bytes, memory_bytes), max_stages or len(loads))
    candidates = _score_spans(loads, replicas, cost, np.asarray(stage_bytes, dtype=np.float64), compute, network,
                              memory_bytes, longest)
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
    replicas: Sequence[int] | np.ndarray | None = None,
    cost: ReplicaCost | None = None,
) -> Move | None:
    """Whether ``me`` should leave its span for another, given the loads (and replica counts) it counts
    in, ``me`` included. ``None`` means stay. ``active`` is the caller's ``rebalancing_needed`` state
    (hysteresis: see there). With a replica ``cost``, a *shrink* (a part of ``me``'s own span: nothing
    to load, the state kept) is taken whenever it raises the bottleneck, balanced swarm or not
    (without a cost, shrinks wait for the hysteresis like any move: taken greedily they cost the
    10 000-peer simulation 0.6% of its bound); a move that loads stages needs the swarm out of
    balance and a rise worth the reload."""
    loads = np.asarray(loads, dtype=np.float64)
    replicas = _replicas(loads, replicas)
    effective = effective_loads(loads, replicas, cost)
    before = bottleneck(effective)
    without, fewer = loads.copy(), replicas.copy()
    span = me.span
    without[span.start:span.start + span.count] -= contribution(me.compute, span.count, me.network)
    fewer[span.start:span.start + span.count] -= 1
    np.maximum(without, 0.0, out=without)
    np.maximum(fewer, 0, out=fewer)
    shrink = _best_shrink(without, fewer, cost, me, effective, before) if cost is not None else None
    if shrink is not None:
        return shrink
    if not rebalancing_needed(effective, margin, active):
        return None  # balanced within the margin: a quiet swarm stays put
    if _cannot_gain(effective, effective_loads(without, fewer, cost), before, me, stage_bytes, memory_bytes,
                    max_stages):
        return None
    new = choose_stages(without, stage_bytes, compute=me.compute, memory_bytes=memory_bytes, network=me.network,
                        max_stages=max_stages, replicas=fewer, cost=cost)
    if new == span:
        return None
    after_loads = _placed(without, fewer, cost, new, contribution(me.compute, new.count, me.network))
    after = bottleneck(after_loads)
    share = contribution(me.compute, new.count, me.network)
    if not _better(after_loads, after, effective, before, min_rise=max(MIN_EFFICIENCY * share, MIN_GAIN * before)):
        return None
    return Move(old=span, new=new, bottleneck_before=before, bottleneck_after=after)


def plan_joiners(
    loads: Sequence[float] | np.ndarray,
    replicas: Sequence[int] | np.ndarray,
    joiners: Sequence[Joiner],
    stage_bytes: Sequence[int],
    *,
    cost: ReplicaCost | None = None,
    max_stages: int | None = None,
) -> dict[str, Span]:
    """Where each of ``joiners`` (peers that claimed at about the same moment) goes, on top of the
    stages' current ``loads`` and ``replicas``. Every joiner runs this on what it sees and takes its own
    span, so it depends on nothing but its arguments (ties: by peer id). Two plans are built, each peer
    in turn choosing on what the ones before it chose: *greedy* (any span) and *spread* (each takes the
    fewest stages that still let the rest of the group cover every empty stage, so the group splits
    the pipeline instead of each holding the whole model); then each plan is improved by letting every
    joiner re-choose with the others fixed while that helps, and the better plan wins (``_plan_key``).
    A joiner without memory for one stage gets no span (it is left out of the result)."""
    loads = np.asarray(loads, dtype=np.float64)
    base = _replicas(loads, replicas)
    order = sorted(joiners, key=lambda j: (-j.compute, j.peer_id))
    order = [j for j in order if min(stage_bytes) <= j.memory_bytes]
    plans = [_plan_in_turn(loads, base, order, stage_bytes, cost, max_stages, spread=spread)
             for spread in (False, True)]
    plans = [_improve(loads, base, order, plan, stage_bytes, cost, max_stages) for plan in plans]
    best = plans[0]
    for plan in plans[1:]:
        if _plan_key(loads, base, order, plan, cost) > _plan_key(loads, base, order, best, cost):
            best = plan
    return {joiner.peer_id: span for joiner, span in zip(order, best)}


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


def _replicas(loads: np.ndarray, replicas: Sequence[int] | np.ndarray | None) -> np.ndarray:
    """Replica counts as an int array (without counts: one wherever a stage has load)."""
    if replicas is None:
        return (loads > 0).astype(np.int64)
    replicas = np.asarray(replicas, dtype=np.int64)
    if replicas.shape != loads.shape:
        raise ValueError(f"need one replica count per stage, got {len(replicas)} for {len(loads)} stages")
    return replicas


def _placed(loads: np.ndarray, replicas: np.ndarray, cost: ReplicaCost | None, span: Span,
            share: float) -> np.ndarray:
    """Effective loads once a peer giving ``share`` to each stage of ``span`` is added."""
    loads, replicas = loads.copy(), replicas.copy()
    loads[span.start:span.start + span.count] += share
    replicas[span.start:span.start + span.count] += 1
    return effective_loads(loads, replicas, cost)


def _best_shrink(without: np.ndarray, fewer: np.ndarray, cost: ReplicaCost | None, me: PlacedPeer,
                 effective: np.ndarray, before: float) -> Move | None:
    """The part of ``me``'s span that, kept alone, raises ``(bottleneck, -stages at it)`` the most (by
    at least ``MIN_GAIN``); None if no part does. Dropping a stage only ``me`` serves leaves it empty,
    so a shrink never abandons a stage."""
    best: tuple[float, Move] | None = None
    for count in range(1, me.span.count):
        for start in range(me.span.start, me.span.end - count + 2):
            part = Span(start, count)
            after_loads = _placed(without, fewer, cost, part, contribution(me.compute, count, me.network))
            after = bottleneck(after_loads)
            if _better(after_loads, after, effective, before, min_rise=MIN_GAIN * before) and \
                    (best is None or after > best[0] * (1 + _TIE)):
                best = (after, Move(old=me.span, new=part, bottleneck_before=before, bottleneck_after=after))
    return best[1] if best is not None else None


def _plan_in_turn(loads: np.ndarray, replicas: np.ndarray, order: Sequence[Joiner], stage_bytes: Sequence[int],
                  cost: ReplicaCost | None, max_stages: int | None, *, spread: bool) -> list[Span]:
    """Each joiner in ``order`` chooses on what the ones before it chose. ``spread``: at most the
    stages it must take so that the joiners after it, one stage each, can fill every empty stage."""
    loads, replicas, spans = loads.copy(), replicas.copy(), []
    for index, joiner in enumerate(order):
        limit = max_stages
        if spread:
            empty = int(np.sum(loads <= 0))
            limit = max(1, math.ceil(empty / (len(order) - index)))
            limit = min(limit, max_stages or limit)
        span = choose_stages(loads, stage_bytes, compute=joiner.compute, memory_bytes=joiner.memory_bytes,
                             network=joiner.network, max_stages=limit, replicas=replicas, cost=cost)
        loads[span.start:span.start + span.count] += contribution(joiner.compute, span.count, joiner.network)
        replicas[span.start:span.start + span.count] += 1
        spans.append(span)
    return spans


def _improve(loads: np.ndarray, replicas: np.ndarray, order: Sequence[Joiner], plan: list[Span],
             stage_bytes: Sequence[int], cost: ReplicaCost | None, max_stages: int | None,
             passes: int = 3) -> list[Span]:
    """Let each joiner in turn re-choose with every other joiner where the plan puts it; keep a change
    only when the whole plan gets better, until a pass changes nothing (bounded)."""
    plan = list(plan)
    for _ in range(passes):
        changed = False
        for index, joiner in enumerate(order):
            others_loads, others_replicas = _with_plan(loads, replicas, order, plan, skip=index)
            span = choose_stages(others_loads, stage_bytes, compute=joiner.compute,
                                 memory_bytes=joiner.memory_bytes, network=joiner.network, max_stages=max_stages,
                                 replicas=others_replicas, cost=cost)
            if span == plan[index]:
                continue
            trial = plan[:index] + [span] + plan[index + 1:]
            if _plan_key(loads, replicas, order, trial, cost) > _plan_key(loads, replicas, order, plan, cost):
                plan, changed = trial, True
        if not changed:
            break
    return plan


def _with_plan(loads: np.ndarray, replicas: np.ndarray, order: Sequence[Joiner], plan: Sequence[Span],
               skip: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    loads, replicas = loads.copy(), replicas.copy()
    for index, (joiner, span) in enumerate(zip(order, plan)):
        if index != skip:
            loads[span.start:span.start + span.count] += contribution(joiner.compute, span.count, joiner.network)
            replicas[span.start:span.start + span.count] += 1
    return loads, replicas


def _plan_key(loads: np.ndarray, replicas: np.ndarray, order: Sequence[Joiner], plan: Sequence[Span],
              cost: ReplicaCost | None) -> tuple:
    """How good a plan is, as a sortable key: its effective bottleneck rounded to ``REDUNDANCY_SLACK``
    steps (a plan a step slower still loses), then fewer stages with a single replica, then the exact
    bottleneck, then fewer replicas in all (less averaging and memory)."""
    final_loads, final_replicas = _with_plan(loads, replicas, order, plan)
    effective = effective_loads(final_loads, final_replicas, cost)
    low = bottleneck(effective)
    band = math.floor(math.log(low) / math.log1p(REDUNDANCY_SLACK)) if low > 0 else -math.inf
    return band, -int(np.sum(final_replicas < 2)), low, -int(final_replicas.sum())


def _cannot_gain(loads: np.ndarray, without: np.ndarray, before: float, me: PlacedPeer,
                 stage_bytes: Sequence[int], memory_bytes: int, max_stages: int | None) -> bool:
    """A cheap exact ``no``. A span of at most ``m`` stages leaves one of the ``m + 1`` least-served
    stages as it is, so the bottleneck cannot rise above that stage; a move must raise it by at least
    ``MIN_EFFICIENCY`` of the smallest share this peer could bring and ``MIN_GAIN``; with a single
    stage at the bottleneck there is no tie to break either. Most peers of a settled swarm stop here.
    (``loads`` and ``without`` are effective loads, with and without this peer.)"""
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


def _score_spans(loads: np.ndarray, replicas: np.ndarray, cost: ReplicaCost | None, sizes: np.ndarray,
                 compute: float, network: float, memory: float, longest: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """New bottleneck, utility gain, stages left with a single replica, and whether it fits, of every
    span on a count x start grid (row ``k`` holds spans of ``k + 1`` stages)."""
    n = len(loads)
    counts, starts = np.arange(1, longest + 1), np.arange(n)
    ends = starts[None, :] + counts[:, None]  # exclusive end of each span
    valid = ends <= n
    ends = np.minimum(ends, n)
    shares = np.minimum(compute / counts, network)
    current = effective_loads(loads, replicas, cost)
    joined = np.stack([effective_loads(loads + share, replicas + 1, cost) for share in shares])  # (counts, n)
    window_min = _window_minima(joined, counts, starts, ends)
    prefix = np.concatenate([[np.inf], np.minimum.accumulate(current)])  # prefix[a] = min(current[:a])
    suffix = np.concatenate([np.minimum.accumulate(current[::-1])[::-1], [np.inf]])  # suffix[j] = min(current[j:])
    new_min = np.minimum(window_min, np.minimum(prefix[starts][None, :], suffix[ends]))
    floor = max(compute, 1.0) * 1e-6  # an empty stage weighs log(floor): filling it gains a lot
    lifted = np.log(joined + floor) - np.log(current + floor)[None, :]
    lifted_sums = np.concatenate([np.zeros((longest, 1)), np.cumsum(lifted, axis=1)], axis=1)
    rows = np.arange(longest)[:, None]
    gain = lifted_sums[rows, ends] - lifted_sums[rows, starts[None, :]]
    single = (replicas < 2).astype(np.float64)  # stages with at most one replica, and how many a span lifts
    lone_sums = np.concatenate([[0.0], np.cumsum(replicas == 1)])
    lone_left = float(single.sum()) - (lone_sums[ends] - lone_sums[starts][None, :])
    if cost is None:
        lone_left = np.zeros_like(new_min)  # without a replica cost, redundancy plays no part
    size_sums = np.concatenate([[0.0], np.cumsum(sizes)])
    fits = valid & (size_sums[ends] - size_sums[starts][None, :] <= memory)
    return new_min, gain, lone_left, fits


def _window_minima(values: np.ndarray, counts: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """``min(values[k, start:end])`` on the count x start grid (row ``k`` for spans of ``counts[k]``
    stages), from sparse tables of power-of-two windows (two overlapping windows cover any span): a few
    array operations instead of one per count."""
    rows, n = values.shape
    table = [np.concatenate([values, np.full((rows, n), np.inf)], axis=1)]
    while 2 ** len(table) <= counts[-1]:
        half = 2 ** (len(table) - 1)
        previous = table[-1]
        table.append(np.minimum(previous, np.concatenate([previous[:, half:], np.full((rows, half), np.inf)], axis=1)))
    table = np.stack(table)  # (levels, rows, 2n)
    level = np.floor(np.log2(counts)).astype(np.int64)[:, None]
    second = np.maximum(ends - 2 ** level, 0)
    row = np.arange(rows)[:, None]
    return np.minimum(table[level, row, starts[None, :]], table[level, row, second])


def _pick(scored: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], rng: random.Random | None) -> Span:
    """Among the spans within ``REDUNDANCY_SLACK`` of the highest bottleneck, the fewest stages left
    with a single replica (all zero without a replica cost); then the highest bottleneck, then the
    highest utility gain, then the shortest span, then ``rng`` (or the lowest start)."""
    new_min, gain, lone_left, fits = scored
    new_min = np.where(fits, new_min, -np.inf)
    best = new_min.max()
    if best > 0:
        near = new_min >= best / (1 + REDUNDANCY_SLACK)
        near &= lone_left <= np.where(near, lone_left, np.inf).min() + 0.5
        best = np.where(near, new_min, -np.inf).max()
        new_min = np.where(near, new_min, -np.inf)
    chosen = new_min >= best - _TIE * max(abs(best), 1.0)
    gain = np.where(chosen, gain, -np.inf)
    best_gain = gain.max()
    chosen &= gain >= best_gain - _TIE * max(abs(best_gain), 1.0)
    row = int(np.argmax(chosen.any(axis=1)))
    starts = [int(s) for s in np.flatnonzero(chosen[row])]
    start = rng.choice(starts) if rng is not None else starts[0]
    return Span(start=start, count=row + 1)
