"""The data of ``swarm status``: the run, its stages and peers, the bottleneck, contributions and warnings.

``collect_status`` reads the DHT records (``{run}_manifest``, ``{run}_stage_{i}``, ``{run}_telemetry``,
and ``{run}_data`` for the data progress and the last evaluation)
and ``build_status`` turns them into one frozen, versioned model (``Status``, version ``STATUS_VERSION``);
the terminal view (``swarm.status_view.render_status``, refreshed by ``rich.live`` in the CLI), ``--json``
and the bootstrap's ``/api/status`` and dashboard all read that model (the JSON is its ``model_dump``),
so it lives below every one of them. The decisions in it are pure functions with table tests:
``stage_capacities``, ``marginal_contributions``, ``run_state``, ``status_warnings``, ``without_cut_off``.

Peers the run owner cut off (their key revoked, or banned or kicked from the dashboard) leave the
views as soon as the run-control record says so, not when their last record expires: a record stays
in the DHT up to its TTL (60 s) after its peer is gone, so a revoked peer used to be listed online
for nearly a minute after it had left.
"""

from __future__ import annotations

import asyncio
from typing import Mapping, Sequence

from hivemind.utils import get_dht_time

from core.messages import FrozenModel
from dht.auth import token_key_id
from dht.control import get_bootstraps, get_control
from dht.records import SwarmDHT
from net.relay import is_relayed, relay_of
from dht.schemas import (RECORD_REFRESH, DataProgress, DataRecord, EvalPoint, HardwareSummary, Manifest, MetricsRecord,
                         MetricsRole, PeerRecord, PeerState, TrainerRecord)
from core.types import PeerId, StageIndex

__all__ = [
    "Status",
    "RunSummary",
    "StageStatus",
    "PeerStatus",
    "DelegationLink",
    "STATUS_VERSION",
    "STALE_AFTER",
    "collect_status",
    "build_status",
    "stage_capacities",
    "marginal_contributions",
    "run_state",
    "status_warnings",
    "without_cut_off",
]

STATUS_VERSION = 5
"""3: data progress and the last evaluation; 4: each peer's ``latency_ms`` (its record's median round
trip), for the dashboard's fleet table; 5: each peer's ``relay`` (behind NAT: the relay its callers reach
it through)."""
STALE_AFTER = 2 * RECORD_REFRESH + 5.0
"""A record not rewritten for this long (its peer refreshes every RECORD_REFRESH s) is stale."""
TRAINER_ACTIVE = 60.0
"""A trainer that reported within this many seconds is training."""


class RunSummary(FrozenModel):
    """What the trainers report: ``state`` is ``training``, ``idle`` or ``blocked`` (``run_state``)."""

    state: str
    step: int
    loss: float | None
    loss_trend: list[float]
    tokens_per_s: float
    trainers: int


class StageStatus(FrozenModel):
    """One stage: its layers ``[start, end)``, the peers serving it (not offline) and those online."""

    index: int
    layers: list[int]
    peers: list[PeerId]
    online: int
    online_peers: list[str]
    throughput: float


class PeerStatus(FrozenModel):
    """One peer, over all the stages it serves: its record, its metrics and what it contributes."""

    peer_id: PeerId
    stages: list[StageIndex]
    state: str
    throughput: float
    load: float
    maddrs: list[str]
    hardware: HardwareSummary
    age: float
    delegate_of: PeerId | None
    step: int
    requests_per_s: float
    tokens_per_s: float
    tokens: int
    microbatches: int
    ledger_entries: int
    marginal: float
    marginal_share: float
    stale: bool
    contribution_share: float
    latency_ms: float | None = None
    relay: PeerId | None = None  # behind NAT: the relay its callers reach it through (version 5)


class DelegationLink(FrozenModel):
    """A stage a delegate serves for a delegator (the delegator's signed record says so)."""

    delegate: PeerId
    delegator: PeerId
    stage: StageIndex
    gpu_count: int


class Status(FrozenModel):
    """The status of a run: what ``swarm status`` draws, ``--json`` prints and ``/api/status`` serves."""

    version: int = STATUS_VERSION
    time: float
    run_id: str
    step: int
    trainers: int
    model: str
    num_layers: int
    target_batch_size: int
    run: RunSummary
    stages: list[StageStatus]
    peers: list[PeerStatus]
    bottleneck_stage: int | None
    swarm_throughput: float
    delegations: list[DelegationLink]
    warnings: list[str]
    data: DataProgress | None = None
    eval: EvalPoint | None = None


async def collect_status(dht: SwarmDHT, *, manifest_timeout: float = 10.0) -> Status:
    """Read the run's records from the DHT (the manifest first, then the rest at once) and build the status."""
    manifest = await dht.wait_manifest(manifest_timeout)
    records, metrics, trainers, control, data = await asyncio.gather(
        dht.all_records(manifest.num_stages), dht.telemetry_records(), dht.trainer_records(), get_control(dht),
        _data_record(dht))
    if control is not None:
        records = without_cut_off(records, set(control.revoked), set(control.banned))
    return build_status(manifest, records, metrics, now=get_dht_time(), trainers=trainers, data=data)


async def _data_record(dht: SwarmDHT) -> DataRecord | None:
    """The data record of the run's primary bootstrap (the one that leases shards; anyone can store a
    record under the key, only a bootstrap's is believed)."""
    primaries = {record.peer_id for record, _ in await get_bootstraps(dht) if record.role == "primary"}
    return next((r for r in await dht.data_records() if r.peer_id in primaries), None)


def without_cut_off(records: Mapping[int, Sequence[PeerRecord]], revoked: set[str],
                    banned: set[str]) -> dict[int, list[PeerRecord]]:
    """The records minus those of banned peers and those carrying a token of a revoked key."""
    return {stage: [r for r in found if r.peer_id not in banned and r.delegate_of not in banned
                    and not (r.access_token and token_key_id(r.access_token) in revoked)]
            for stage, found in records.items()}


def stage_capacities(records: Mapping[int, Sequence[PeerRecord]], num_stages: int) -> list[dict[str, float]]:
    """Per stage, the throughput (tokens/s) of each online peer serving it."""
    return [{r.peer_id: r.throughput for r in records.get(i, ()) if r.state == PeerState.ONLINE}
            for i in range(num_stages)]


def _bottleneck(capacities: Sequence[Mapping[str, float]], without: str | None = None) -> float:
    return min((sum(t for p, t in stage.items() if p != without) for stage in capacities), default=0.0)


def marginal_contributions(capacities: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """How much the swarm's throughput (its slowest stage's total) would drop without each peer.

    A peer that is the only one on a stage takes everything with it; a peer among replicas of a
    stage that is not the bottleneck takes only what the bottleneck would lose, often nothing.
    """
    base = _bottleneck(capacities)
    peers = {peer for stage in capacities for peer in stage}
    return {peer: round(base - _bottleneck(capacities, without=peer), 3) for peer in sorted(peers)}


def run_state(stage_online: Sequence[int], trainer_ages: Sequence[float]) -> str:
    """``blocked`` (a stage has no online peer), ``training`` (a trainer reported recently) or ``idle``."""
    if not stage_online or min(stage_online) == 0:
        return "blocked"
    return "training" if any(age < TRAINER_ACTIVE for age in trainer_ages) else "idle"


def status_warnings(stage_peers: Sequence[Sequence[str]], ages: Mapping[str, float]) -> list[str]:
    """A stage with no or one online peer, and every peer whose record is stale."""
    warnings = []
    for index, peers in enumerate(stage_peers):
        if not peers:
            warnings.append(f"stage {index} has no online peer: training is blocked")
        elif len(peers) == 1:
            warnings.append(f"stage {index} has one replica ({peers[0][-8:]}): if it leaves, training stops")
    for peer, age in sorted(ages.items()):
        if age > STALE_AFTER:
            warnings.append(f"peer {peer[-8:]} is stale: its record was last refreshed {age:.0f} s ago")
    return warnings


def build_status(manifest: Manifest, records: Mapping[int, Sequence[PeerRecord]],
                 metrics: Sequence[MetricsRecord], *, now: float,
                 trainers: Sequence[TrainerRecord] = (), data: DataRecord | None = None) -> Status:
    """The status from the records; pure. ``step`` and ``trainers`` at the top are the collaborative
    step and the online trainers (``TrainerRecord``); ``run`` adds what trainers report in their
    metrics records (loss trend, tokens/s)."""
    online = [t for t in trainers if t.online]
    collaborative_step = max((t.step for t in trainers), default=0)  # a trainer that left still tells the step it reached
    capacities = stage_capacities(records, manifest.num_stages)
    marginal = marginal_contributions(capacities)
    swarm_rate = _bottleneck(capacities)
    by_peer = {m.peer_id: m for m in metrics if m.role == MetricsRole.PEER}
    peers, stages = _peers(records, by_peer, marginal, swarm_rate, now), []
    for index, layers in enumerate(manifest.stages):
        live = [r.peer_id for r in records.get(index, ()) if r.state != PeerState.OFFLINE]
        stages.append(StageStatus(index=index, layers=layers.as_list(), peers=live, online=len(capacities[index]),
                                  online_peers=sorted(capacities[index]),
                                  throughput=round(sum(capacities[index].values()), 1)))
    bottleneck = min(stages, key=lambda s: s.throughput).index if stages else None
    return Status(
        time=now, run_id=manifest.run_id, step=collaborative_step, trainers=len(online), model=manifest.model,
        num_layers=manifest.num_layers, target_batch_size=manifest.target_batch_size,
        run=_run(capacities, [m for m in metrics if m.role == MetricsRole.TRAINER], collaborative_step, now),
        stages=stages, peers=peers, bottleneck_stage=bottleneck, swarm_throughput=round(swarm_rate, 1),
        delegations=_delegations(records),
        warnings=status_warnings([list(c) for c in capacities], {p.peer_id: p.age for p in peers}),
        data=data.progress if data is not None else None, eval=data.eval if data is not None else None,
    )


def _delegations(records: Mapping[int, Sequence[PeerRecord]]) -> list[DelegationLink]:
    """One link per stage a delegate serves for a delegator (the delegator's signed record says so):
    a delegate may serve stages of its own beside it, so links come from records, not peers."""
    return [DelegationLink(delegate=r.peer_id, delegator=r.delegate_of, stage=index, gpu_count=r.hardware.gpu_count)
            for index in sorted(records) for r in records[index] if r.delegate_of and r.state != PeerState.OFFLINE]


def _run(capacities: list[dict[str, float]], trainers: list[MetricsRecord], collaborative_step: int,
         now: float) -> RunSummary:
    latest = max(trainers, key=lambda m: (m.step, m.updated), default=None)
    active = [m for m in trainers if now - m.updated < TRAINER_ACTIVE]
    return RunSummary(
        state=run_state([len(c) for c in capacities], [now - m.updated for m in trainers]),
        step=max(collaborative_step, latest.step if latest else 0),
        loss=latest.loss if latest else None,
        loss_trend=list(latest.loss_trend) if latest else [],
        tokens_per_s=round(sum(m.tokens_per_s for m in active), 1),
        trainers=len(active),
    )


def _peers(records: Mapping[int, Sequence[PeerRecord]], metrics: Mapping[str, MetricsRecord],
           marginal: Mapping[str, float], swarm_rate: float, now: float) -> list[PeerStatus]:
    first: dict[str, PeerRecord] = {}
    stages: dict[str, list[int]] = {}
    for index in sorted(records):
        for r in records[index]:
            if r.state != PeerState.OFFLINE:
                first.setdefault(r.peer_id, r)
                stages.setdefault(r.peer_id, []).append(index)
    total = sum(metrics[p].tokens for p in first if p in metrics)
    return [_peer(r, stages[peer_id], metrics.get(peer_id), marginal.get(peer_id, 0.0), swarm_rate, total, now)
            for peer_id, r in first.items()]


def _peer(r: PeerRecord, stages: list[StageIndex], m: MetricsRecord | None, marginal: float, swarm_rate: float,
          total_tokens: int, now: float) -> PeerStatus:
    """One peer from its first record (in stage order) and its metrics record, if any."""
    age = round(now - r.updated, 1) if r.updated else 0.0
    tokens = m.tokens if m else 0
    return PeerStatus(
        peer_id=r.peer_id, stages=stages, state=r.state.value, throughput=r.throughput, load=r.load,
        maddrs=r.maddrs, hardware=r.hardware, age=age, delegate_of=r.delegate_of,
        relay=next((relay_of(a) for a in r.maddrs if is_relayed(a)), None),
        step=max(r.step, m.step if m else 0),  # its optimizer step, from the fresher of the two
        requests_per_s=m.requests_per_s if m else 0.0, tokens_per_s=m.tokens_per_s if m else 0.0,
        tokens=tokens, microbatches=m.microbatches if m else 0, ledger_entries=m.ledger_entries if m else 0,
        marginal=marginal, marginal_share=round(marginal / swarm_rate, 3) if swarm_rate else 0.0,
        stale=age > STALE_AFTER, contribution_share=round(tokens / total_tokens, 3) if total_tokens else 0.0,
        latency_ms=r.latency_ms,
    )
