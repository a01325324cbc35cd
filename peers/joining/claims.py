"""What placement needs from the DHT's records and this peer's measurements (``shards.placement`` is
pure): the stages' loads and replica counts, the cost of a replica in training, and the peers that
are joining at the same moment as this one."""

from __future__ import annotations

import math
from typing import Collection, Mapping, Sequence

from dht.schemas import Manifest, PeerRecord, PeerState
from peers.training.routing import record_loads, record_replicas
from shards.placement import Joiner, ReplicaCost
from core.config import PeerSettings

__all__ = ["TOKENS_PER_SAMPLE", "replica_cost", "joiners_in", "loads_without"]

TOKENS_PER_SAMPLE = 128  # a training row's tokens when the run does not say (the README's batches are 8 x 128)
_GIB = 2**30


def replica_cost(manifest: Manifest, stage_bytes: Sequence[int], settings: PeerSettings,
                 bandwidth_mbps: float | None) -> ReplicaCost:
    """An averaging round costs ``settings.averaging_cost`` s plus the stage's parameters (a quarter of
    what the stage needs in memory: weights, gradients and AdamW's two moments) over this peer's
    measured link (a peer sees its own link, not the others': the slowest one is not known here)."""
    step_tokens = settings.step_tokens or manifest.target_batch_size * TOKENS_PER_SAMPLE
    bandwidth = bandwidth_mbps * 1e6 / 8 if bandwidth_mbps else math.inf
    return ReplicaCost(step_tokens=float(step_tokens), round_seconds=settings.averaging_cost,
                       param_bytes=tuple(size / 4 for size in stage_bytes), bandwidth=bandwidth)


def joiners_in(records: Mapping[int, Sequence[PeerRecord]], me: Joiner, *, now: float,
               settled_after: float) -> list[Joiner]:
    """``me`` and every other peer that has claimed stages (``loading``) without serving any yet, within
    the last ``settled_after`` s: the group that joins together. An older claim has been verified
    already (its peer is loading what it claimed: a big model takes minutes) and stays where it is,
    counted in the loads. A peer loading a move while it serves elsewhere is not joining, and a
    record without its speeds or memory (an older peer) cannot be planned for."""
    serving = {r.peer_id for rs in records.values() for r in rs if r.state in (PeerState.ONLINE, PeerState.DRAINING)}
    found = {me.peer_id: me}
    for rs in records.values():
        for r in rs:
            if r.state != PeerState.LOADING or r.peer_id in serving or r.peer_id in found:
                continue
            if r.claimed is None or now - r.claimed > settled_after:
                continue
            if r.compute and r.memory_gib is not None and r.delegate_of is None:
                found[r.peer_id] = Joiner(r.peer_id, r.compute, int(r.memory_gib * _GIB), r.network or math.inf)
    return sorted(found.values(), key=lambda j: j.peer_id)


def loads_without(num_stages: int, records: Mapping[int, Sequence[PeerRecord]],
                  exclude: Collection[str]) -> tuple[list[float], list[int]]:
    """Loads and replica counts of every stage, leaving out ``exclude``."""
    return (record_loads(num_stages, records, exclude=exclude),
            record_replicas(num_stages, records, exclude=exclude))
