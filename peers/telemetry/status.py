"""``swarm status``: the run, its stages and peers, the bottleneck, contributions and warnings.

``collect_status`` reads the DHT records (``{run}_manifest``, ``{run}_stage_{i}``, ``{run}_telemetry``)
and ``build_status`` turns them into one versioned JSON-able dict (``STATUS_VERSION``); the terminal
view (``render_status``, refreshed by ``rich.live`` in the CLI), ``--json`` and the bootstrap's
dashboard are views of that dict. The decisions in it are pure functions with table tests:
``stage_capacities``, ``marginal_contributions``, ``run_state``, ``status_warnings``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from hivemind.utils import get_dht_time
from rich import box
from rich.console import Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dht.records import SwarmDHT
from dht.schemas import RECORD_REFRESH, Manifest, MetricsRecord, MetricsRole, PeerRecord, PeerState, TrainerRecord

__all__ = [
    "STATUS_VERSION",
    "STALE_AFTER",
    "collect_status",
    "build_status",
    "render_status",
    "stage_capacities",
    "marginal_contributions",
    "run_state",
    "status_warnings",
    "sparkline",
]

STATUS_VERSION = 2
STALE_AFTER = 2 * RECORD_REFRESH + 5.0
"""A record not rewritten for this long (its peer refreshes every RECORD_REFRESH s) is stale."""
TRAINER_ACTIVE = 60.0
"""A trainer that reported within this many seconds is training."""


async def collect_status(dht: SwarmDHT, *, manifest_timeout: float = 10.0) -> dict[str, Any]:
    """Read the run's records from the DHT and build the status dict."""
    manifest = await dht.wait_manifest(manifest_timeout)
    records = await dht.all_records(manifest.num_stages)
    metrics = await dht.telemetry_records()
    trainers = await dht.trainer_records()
    return build_status(manifest, records, metrics, now=get_dht_time(), trainers=trainers)


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


def sparkline(values: Sequence[float]) -> str:
    """One character per value, ▁ (lowest) to █ (highest)."""
    bars = "▁▂▃▄▅▆▇█"
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low or 1.0
    return "".join(bars[min(len(bars) - 1, int((v - low) / span * (len(bars) - 1) + 0.5))] for v in values)


def build_status(manifest: Manifest, records: Mapping[int, Sequence[PeerRecord]],
                 metrics: Sequence[MetricsRecord], *, now: float,
                 trainers: Sequence[TrainerRecord] = ()) -> dict[str, Any]:
    """The status dict (version ``STATUS_VERSION``) from the records; pure. ``step`` and
    ``trainers`` at the top are the collaborative step and the online trainers (``TrainerRecord``);
    ``run`` adds what trainers report in their metrics records (loss trend, tokens/s)."""
    online = [t for t in trainers if t.online]
    collaborative_step = max((t.step for t in trainers), default=0)  # a trainer that left still tells the step it reached
    capacities = stage_capacities(records, manifest.num_stages)
    marginal = marginal_contributions(capacities)
    swarm_rate = _bottleneck(capacities)
    by_peer = {m.peer_id: m for m in metrics if m.role == MetricsRole.PEER}
    peers, stages = _peers(records, by_peer, marginal, swarm_rate, now), []
    for index, layers in enumerate(manifest.stages):
        live = [r.peer_id for r in records.get(index, ()) if r.state != PeerState.OFFLINE]
        stages.append({"index": index, "layers": layers.as_list(), "peers": live,
                       "online": len(capacities[index]), "online_peers": sorted(capacities[index]),
                       "throughput": round(sum(capacities[index].values()), 1)})
    bottleneck = min(stages, key=lambda s: s["throughput"])["index"] if stages else None
    return {
        "version": STATUS_VERSION,
        "time": now,
        "run_id": manifest.run_id,
        "step": collaborative_step,
        "trainers": len(online),
        "model": manifest.model,
        "num_layers": manifest.num_layers,
        "target_batch_size": manifest.target_batch_size,
        "run": _run(capacities, [m for m in metrics if m.role == MetricsRole.TRAINER], collaborative_step, now),
        "stages": stages,
        "peers": peers,
        "bottleneck_stage": bottleneck,
        "swarm_throughput": round(swarm_rate, 1),
        "delegations": _delegations(records),
        "warnings": status_warnings([list(c) for c in capacities], {p["peer_id"]: p["age"] for p in peers}),
    }


def _delegations(records: Mapping[int, Sequence[PeerRecord]]) -> list[dict[str, Any]]:
    """One link per stage a delegate serves for a delegator (the delegator's signed record says so):
    a delegate may serve stages of its own beside it, so links come from records, not peers."""
    return [{"delegate": r.peer_id, "delegator": r.delegate_of, "stage": index, "gpu_count": r.hardware.gpu_count}
            for index in sorted(records) for r in records[index] if r.delegate_of and r.state != PeerState.OFFLINE]


def _run(capacities: list[dict[str, float]], trainers: list[MetricsRecord], collaborative_step: int,
         now: float) -> dict[str, Any]:
    latest = max(trainers, key=lambda m: (m.step, m.updated), default=None)
    active = [m for m in trainers if now - m.updated < TRAINER_ACTIVE]
    return {
        "state": run_state([len(c) for c in capacities], [now - m.updated for m in trainers]),
        "step": max(collaborative_step, latest.step if latest else 0),
        "loss": latest.loss if latest else None,
        "loss_trend": list(latest.loss_trend) if latest else [],
        "tokens_per_s": round(sum(m.tokens_per_s for m in active), 1),
        "trainers": len(active),
    }


def _peers(records: Mapping[int, Sequence[PeerRecord]], metrics: Mapping[str, MetricsRecord],
           marginal: Mapping[str, float], swarm_rate: float, now: float) -> list[dict[str, Any]]:
    peers: dict[str, dict[str, Any]] = {}
    for index in sorted(records):
        for r in records[index]:
            if r.state == PeerState.OFFLINE:
                continue
            m = metrics.get(r.peer_id)
            peer = peers.setdefault(r.peer_id, {
                "peer_id": r.peer_id, "stages": [], "state": r.state.value, "throughput": r.throughput,
                "load": r.load, "maddrs": r.maddrs, "hardware": r.hardware.model_dump(mode="json"),
                "age": round(now - r.updated, 1) if r.updated else 0.0, "delegate_of": r.delegate_of,
                "step": max(r.step, m.step if m else 0),  # its optimizer step, from the fresher of the two
                "requests_per_s": m.requests_per_s if m else 0.0, "tokens_per_s": m.tokens_per_s if m else 0.0,
                "tokens": m.tokens if m else 0, "microbatches": m.microbatches if m else 0,
                "ledger_entries": m.ledger_entries if m else 0,
                "marginal": marginal.get(r.peer_id, 0.0),
                "marginal_share": round(marginal.get(r.peer_id, 0.0) / swarm_rate, 3) if swarm_rate else 0.0,
            })
            peer["stages"].append(index)
    total = sum(p["tokens"] for p in peers.values())
    for peer in peers.values():
        peer["stale"] = peer["age"] > STALE_AFTER
        peer["contribution_share"] = round(peer["tokens"] / total, 3) if total else 0.0
    return list(peers.values())


def _short(peer_id: str) -> str:
    return peer_id[-8:]


def _hardware(hw: Mapping[str, Any]) -> str:
    if hw.get("gpu_count"):
        parts = [f"{hw['gpu_count']}xGPU"]
        if hw.get("gpu_util_percent") is not None:
            parts.append(f"{hw['gpu_util_percent']:.0f}%")
        if hw.get("gpu_memory_used_gib") is not None:
            parts.append(f"{hw['gpu_memory_used_gib']:.0f}/{(hw.get('gpu_memory_gib') or 0) * hw['gpu_count']:.0f}G")
        if hw.get("gpu_temperature_c") is not None:
            parts.append(f"{hw['gpu_temperature_c']:.0f}C")
        return " ".join(parts)
    return f"{hw.get('cpu_count', 0)}cpu {hw.get('cpu_percent', 0):.0f}% {hw.get('ram_used_gib', 0):.0f}/{hw.get('ram_gib', 0):.0f}G"


def _rate(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:,.0f}"


def _run_line(status: Mapping[str, Any]) -> Text:
    run = status["run"]
    colors = {"training": "green", "idle": "yellow", "blocked": "red"}
    line = Text.assemble((f"{run['state']}", f"bold {colors.get(run['state'], 'white')}"),
                         f"  step {run['step']}  {run['trainers']} trainer(s)  {_rate(run['tokens_per_s'])} tok/s "
                         f"trained  swarm {_rate(status['swarm_throughput'])} tok/s")
    if run["loss"] is not None:
        line.append(f"\nloss {run['loss']:.3f} ")
        line.append(sparkline(run["loss_trend"]), style="cyan")
    return line


def _grid(status: Mapping[str, Any]) -> Table:
    grid = Table(box=box.SIMPLE_HEAD, expand=False, pad_edge=False, title="stages x peers", title_justify="left")
    for name, justify in (("stg", "right"), ("layers", "left"), ("peer", "left"), ("state", "left"),
                          ("tok/s", "right"), ("load", "right"), ("hardware", "left")):
        grid.add_column(name, justify=justify, no_wrap=True)
    peers = {p["peer_id"]: p for p in status["peers"]}
    for stage in status["stages"]:
        hot = stage["index"] == status["bottleneck_stage"]
        style = "bold red" if hot else None
        start, end = stage["layers"]
        label = f"{stage['index']}" + ("◀" if hot else "")
        if not stage["peers"]:
            grid.add_row(label, f"[{start}, {end})", "-", "none", "0", "", "", style="bold red")
        for n, peer_id in enumerate(stage["peers"]):
            p = peers[peer_id]
            state = "stale" if p["stale"] else p["state"]
            grid.add_row(label if n == 0 else "", f"[{start}, {end})" if n == 0 else "", Text(_short(peer_id)), Text(state),
                         _rate(p["throughput"]), f"{p['load']:.0f}", _hardware(p["hardware"]), style=style)
    return grid


def _marginal(peer: Mapping[str, Any]) -> str:
    """What the swarm's throughput would lose without this peer: ``-400 (100%)``, or ``0``."""
    if not peer["marginal"]:
        return "0"
    return f"-{_rate(peer['marginal'])} ({peer['marginal_share']:.0%})"


def _contributions(status: Mapping[str, Any]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="contribution", title_justify="left")
    for name in ("peer", "tokens", "share", "marginal", "served", "req/s", "ledger"):
        table.add_column(name, justify="left" if name == "peer" else "right", no_wrap=True)
    for p in sorted(status["peers"], key=lambda p: -p["tokens"]):
        table.add_row(Text(_short(p["peer_id"])), f"{p['tokens']:,}", f"{p['contribution_share']:.0%}",
                      _marginal(p), f"{_rate(p['tokens_per_s'])}/s",
                      f"{p['requests_per_s']:.1f}", str(p["ledger_entries"]))
    return table


def render_status(status: Mapping[str, Any]) -> Panel:
    """One frame of the terminal view; fits 80 columns."""
    parts: list[Any] = [_run_line(status), _grid(status), _contributions(status)]
    if status["delegations"]:
        links = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="delegation", title_justify="left")
        links.add_column("delegator")
        links.add_column("computed by")
        links.add_column("stage")
        links.add_column("GPUs")
        for link in status["delegations"]:
            links.add_row(Text(_short(link["delegator"])), Text(_short(link["delegate"])), str(link.get("stage", "")),
                          str(link.get("gpu_count", "")))
        parts.append(links)
    for warning in status["warnings"]:
        parts.append(Text(f"! {warning}", style="yellow"))
    model = status["model"] if len(status["model"]) <= 40 else "…" + status["model"][-39:]
    title = f"[bold]{escape(status['run_id'])}[/]: {escape(model)} ({status['num_layers']} layers)"
    return Panel(Group(*parts), title=title, title_align="left", width=80)
