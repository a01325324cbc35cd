"""``swarm status``: the run's stages and the peers serving them, from the DHT.

``collect_status`` builds one versioned JSON-able dict; the terminal table and ``--json`` are two
views of it (the bootstrap's dashboard will be a third).
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from dht.records import SwarmDHT
from dht.schemas import PeerState

__all__ = ["STATUS_VERSION", "collect_status", "render_status"]

STATUS_VERSION = 1


async def collect_status(dht: SwarmDHT, *, manifest_timeout: float = 10.0) -> dict[str, Any]:
    manifest = await dht.wait_manifest(manifest_timeout)
    records = await dht.all_records(manifest.num_stages)
    stages, peers = [], {}
    for index, layers in enumerate(manifest.stages):
        live = [r for r in records.get(index, []) if r.state != PeerState.OFFLINE]
        stages.append({
            "index": index,
            "layers": layers.as_list(),
            "peers": [r.peer_id for r in live],
            "throughput": round(sum(r.throughput for r in live if r.state == PeerState.ONLINE), 1),
        })
        for record in live:
            peer = peers.setdefault(record.peer_id, {
                "peer_id": record.peer_id, "stages": [], "throughput": record.throughput,
                "state": record.state.value, "maddrs": record.maddrs,
                "hardware": record.hardware.model_dump(mode="json"),
            })
            peer["stages"].append(index)
    trainers = await dht.trainer_records()  # a trainer that left still tells the step it reached
    return {
        "version": STATUS_VERSION,
        "run_id": manifest.run_id,
        "step": max((t.step for t in trainers), default=0),
        "trainers": sum(t.online for t in trainers),
        "model": manifest.model,
        "num_layers": manifest.num_layers,
        "target_batch_size": manifest.target_batch_size,
        "stages": stages,
        "peers": list(peers.values()),
        "bottleneck_stage": min(stages, key=lambda s: s["throughput"])["index"],
    }


def render_status(status: dict[str, Any]) -> Panel:
    stages = Table(title="stages", expand=True)
    for column in ("stage", "layers", "peers", "tokens/s"):
        stages.add_column(column)
    for stage in status["stages"]:
        start, end = stage["layers"]
        mark = " ← bottleneck" if stage["index"] == status["bottleneck_stage"] else ""
        color = "red" if not stage["peers"] else "green"
        stages.add_row(str(stage["index"]), f"[{start}, {end})", f"[{color}]{len(stage['peers'])}[/]",
                       f"{stage['throughput']:,.0f}{mark}")
    peers = Table(title="peers", expand=True)
    for column in ("peer", "stages", "state", "tokens/s", "hardware"):
        peers.add_column(column)
    for peer in status["peers"]:
        hw = peer["hardware"]
        device = hw.get("gpu_name") or f"{hw.get('cpu_count')} CPUs"
        peers.add_row(peer["peer_id"][-12:], ",".join(map(str, peer["stages"])), peer["state"],
                      f"{peer['throughput']:,.0f}", f"{device}, {hw.get('ram_gib')} GiB RAM")
    title = (f"run [bold]{status['run_id']}[/]: {status['model']} ({status['num_layers']} layers), "
             f"step {status['step']}, {status['trainers']} trainer(s)")
    return Panel(Group(stages, peers), title=title)
