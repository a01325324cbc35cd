"""Choosing which peer serves each stage of a trainer's next pass: a pure function over DHT records."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

from dht.schemas import PeerRecord, PeerState
from shards.types import LayerRange
from swarm.errors import NoRoute

__all__ = ["Hop", "Route", "plan_route", "coverage"]


@dataclass(frozen=True)
class Hop:
    """One stage of a route and the peer chosen to compute it."""

    stage: int
    layers: LayerRange
    peer_id: str


Route = tuple[Hop, ...]


def plan_route(
    stages: Sequence[LayerRange],
    records: Mapping[int, Sequence[PeerRecord]],
    *,
    banned: Collection[str] = (),
    rng: random.Random | None = None,
) -> Route:
    """For every stage, the online, unbanned peer announcing exactly that stage's layers with the best
    throughput (ties broken by ``rng``). Raises ``NoRoute`` naming every stage nobody serves."""
    hops, missing = [], []
    for index, layers in enumerate(stages):
        candidates = [
            r for r in records.get(index, ())
            if r.state == PeerState.ONLINE and r.layers == layers and r.peer_id not in banned
        ]
        if not candidates:
            missing.append(f"{index} {layers}")
            continue
        best = max(c.throughput for c in candidates)
        fastest = sorted((c for c in candidates if c.throughput == best), key=lambda r: r.peer_id)
        chosen = rng.choice(fastest) if rng is not None else fastest[0]
        hops.append(Hop(index, layers, chosen.peer_id))
    if missing:
        raise NoRoute(f"no online peer serves stage(s) {', '.join(missing)}")
    return tuple(hops)


def coverage(num_stages: int, records: Mapping[int, Sequence[PeerRecord]]) -> list[int]:
    """Number of live (loading or online) peers per stage: what a joining peer balances."""
    live = {PeerState.LOADING, PeerState.ONLINE}
    return [sum(r.state in live for r in records.get(i, ())) for i in range(num_stages)]
