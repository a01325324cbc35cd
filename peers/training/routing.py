"""Choosing which peer serves each stage of a trainer's next pass: pure functions over DHT records,
by expected time (throughput, work already queued there, observed latency)."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

from dht.schemas import PeerRecord, PeerState
from core.types import LayerRange, PeerId, StageIndex
from core.errors import NoRoute

__all__ = ["Hop", "Route", "expected_time", "plan_route", "plan_routes", "coverage", "record_loads", "record_replicas"]


@dataclass(frozen=True)
class Hop:
    """One stage of a route and the peer chosen to compute it."""

    stage: StageIndex
    layers: LayerRange
    peer_id: PeerId


Route = tuple[Hop, ...]


def expected_time(
    record: PeerRecord, *, tokens: int = 1, queue: int = 0, latency_ms: float | None = None
) -> float:
    """Seconds until a microbatch of ``tokens`` comes back from this peer: its round trip (observed by
    this trainer, else the latency the peer published, else 0) plus the work queued ahead of it and its
    own, at the peer's measured throughput."""
    if latency_ms is None:
        latency_ms = record.latency_ms or 0.0
    if record.throughput <= 0:
        return math.inf
    return latency_ms / 1000 + (queue + 1) * tokens / record.throughput


def plan_route(
    stages: Sequence[LayerRange],
    records: Mapping[int, Sequence[PeerRecord]],
    *,
    banned: Collection[str] = (),
    rng: random.Random | None = None,
    tokens: int = 1,
    queue: Mapping[str, int] | None = None,
    latency_ms: Mapping[str, float] | None = None,
) -> Route:
    """For every stage, the online, unbanned peer announcing exactly that stage's layers with the best
    ``expected_time`` (ties broken by ``rng``, else by peer id). ``queue`` counts microbatches already
    sent to each peer, ``latency_ms`` is what the trainer observed; without them the fastest peer wins.
    Loading and draining peers are skipped. Raises ``NoRoute`` naming every stage nobody serves."""
    queue, latency_ms = queue or {}, latency_ms or {}
    hops, missing = [], []
    for index, layers in enumerate(stages):
        candidates = [
            r for r in records.get(index, ())
            if r.state == PeerState.ONLINE and r.layers == layers and r.peer_id not in banned
        ]
        if not candidates:
            missing.append(f"{index} {layers}")
            continue
        times = {r.peer_id: expected_time(r, tokens=tokens, queue=queue.get(r.peer_id, 0),
                                          latency_ms=latency_ms.get(r.peer_id)) for r in candidates}
        best = min(times.values())
        quickest = sorted(peer for peer, t in times.items() if t <= best * (1 + 1e-9) or t == best)
        chosen = rng.choice(quickest) if rng is not None else quickest[0]
        hops.append(Hop(index, layers, chosen))
    if missing:
        raise NoRoute(f"no online peer serves stage(s) {', '.join(missing)}")
    return tuple(hops)


def plan_routes(
    stages: Sequence[LayerRange],
    records: Mapping[int, Sequence[PeerRecord]],
    count: int,
    *,
    banned: Collection[str] = (),
    rng: random.Random | None = None,
    tokens: int = 1,
    latency_ms: Mapping[str, float] | None = None,
) -> list[Route]:
    """Routes for ``count`` microbatches spread over the replicas of each stage: each microbatch goes
    where it is expected back soonest given the ones planned before it (so two equal replicas take
    turns, and a replica twice as fast takes about twice as many)."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    queue: Counter[str] = Counter()
    routes = []
    for _ in range(count):
        route = plan_route(stages, records, banned=banned, rng=rng, tokens=tokens, queue=queue,
                           latency_ms=latency_ms)
        # a peer holding several stages of the route is busy with this microbatch once: its throughput
        # is already per stage of everything it holds
        queue.update({hop.peer_id for hop in route})
        routes.append(route)
    return routes


def coverage(num_stages: int, records: Mapping[int, Sequence[PeerRecord]]) -> list[int]:
    """Number of live (loading or online) peers per stage: what a joining peer balances."""
    live = {PeerState.LOADING, PeerState.ONLINE}
    return [sum(r.state in live for r in records.get(i, ())) for i in range(num_stages)]


def record_loads(
    num_stages: int, records: Mapping[int, Sequence[PeerRecord]], *, exclude: str | Collection[str] | None = None
) -> list[float]:
    """Tokens/s claimed for each stage by live (loading or online) peers, each counted once per stage,
    leaving out ``exclude`` (the peer doing the sums adds itself as it sees fit). Draining peers are
    leaving and do not count: what placement balances. A peer that announced ``loading`` somewhere
    while still online elsewhere has claimed a move: it counts where it goes, not also where it is (so
    two peers that claim the same hole at once each see the other gone from its old stage and back off,
    instead of both finding the move still worth it)."""
    return [float(sum(seen.values())) for seen in _live_claims(num_stages, records, exclude)]


def record_replicas(
    num_stages: int, records: Mapping[int, Sequence[PeerRecord]], *, exclude: str | Collection[str] | None = None
) -> list[int]:
    """How many peers ``record_loads`` counts on each stage: the replicas that average its steps."""
    return [len(seen) for seen in _live_claims(num_stages, records, exclude)]


def _live_claims(num_stages: int, records: Mapping[int, Sequence[PeerRecord]],
                 exclude: str | Collection[str] | None) -> list[dict[str, float]]:
    excluded = {exclude} if isinstance(exclude, str) else set(exclude or ())
    live = {PeerState.LOADING, PeerState.ONLINE}
    moving = {r.peer_id for rs in records.values() for r in rs if r.state == PeerState.LOADING}
    return [{r.peer_id: r.throughput for r in records.get(stage, ())
             if r.state in live and r.peer_id not in excluded
             and (r.state == PeerState.LOADING or r.peer_id not in moving)}
            for stage in range(num_stages)]
