"""The terminal view of ``swarm status``: one ``rich`` frame drawn from the ``Status`` that
``peers.telemetry.status.build_status`` makes (the dashboard and ``--json`` show the same model).
Rendering only: every figure here is computed there."""

from __future__ import annotations

from typing import Any, Sequence

from rich import box
from rich.console import Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dht.schemas import HardwareSummary
from peers.telemetry.status import PeerStatus, Status
from core.types import PeerId

__all__ = ["render_status", "sparkline", "describe_gpus", "describe_device"]


def sparkline(values: Sequence[float]) -> str:
    """One character per value, ▁ (lowest) to █ (highest)."""
    bars = "▁▂▃▄▅▆▇█"
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low or 1.0
    return "".join(bars[min(len(bars) - 1, int((v - low) / span * (len(bars) - 1) + 0.5))] for v in values)


def _short(peer_id: PeerId) -> str:
    return peer_id[-8:]


def describe_gpus(hw: HardwareSummary, *, names: bool = True) -> str | None:
    """The GPU(s) a peer computes on, each as ``cuda:1 H100 87% 61/80G 71C 312W`` (``names`` false:
    ``gpu1 87% 61/80G 71C 312W``, for the status table's narrow column; figures a board does not
    report are left out); None for a peer on the CPU or one that publishes no per-GPU figures."""
    if not hw.gpus:
        return None
    parts = []
    for gpu in hw.gpus:
        figures = [f"{gpu.util_percent:.0f}%" if gpu.util_percent is not None else None,
                   f"{gpu.memory_used_gib:.0f}/{gpu.memory_total_gib:.0f}G",
                   f"{gpu.temperature_c:.0f}C" if gpu.temperature_c is not None else None,
                   f"{gpu.power_w:.0f}W" if gpu.power_w is not None else None]
        if names:
            where = hw.device if len(hw.gpus) == 1 and hw.device.startswith("cuda") else f"gpu{gpu.index}"
            label = [where, gpu.name.removeprefix("NVIDIA ")]
        else:
            label = [f"gpu{gpu.index}"]
        parts.append(" ".join([*label, *(f for f in figures if f)]))
    return ", ".join(parts)


def describe_device(hw: HardwareSummary) -> str:
    """Where a peer computes, for its join line: its GPU(s) with live figures, else ``cpu (no GPU)``."""
    gpus = describe_gpus(hw)
    return gpus if gpus is not None else ("cpu (no GPU)" if hw.device == "cpu" else hw.device)


def _hardware(hw: HardwareSummary) -> str:
    gpus = describe_gpus(hw, names=False)
    if gpus is not None:
        return gpus
    if hw.gpu_count:
        parts = [f"{hw.gpu_count}xGPU"]
        if hw.gpu_util_percent is not None:
            parts.append(f"{hw.gpu_util_percent:.0f}%")
        if hw.gpu_memory_used_gib is not None:
            parts.append(f"{hw.gpu_memory_used_gib:.0f}/{(hw.gpu_memory_gib or 0) * hw.gpu_count:.0f}G")
        if hw.gpu_temperature_c is not None:
            parts.append(f"{hw.gpu_temperature_c:.0f}C")
        return " ".join(parts)
    return f"{hw.cpu_count}cpu {hw.cpu_percent:.0f}% {hw.ram_used_gib:.0f}/{hw.ram_gib:.0f}G"


def _rate(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:,.0f}"


def _run_line(status: Status) -> Text:
    run = status.run
    colors = {"training": "green", "idle": "yellow", "blocked": "red"}
    line = Text.assemble((f"{run.state}", f"bold {colors.get(run.state, 'white')}"),
                         f"  step {run.step}  {run.trainers} trainer(s)  {_rate(run.tokens_per_s)} tok/s "
                         f"trained  swarm {_rate(status.swarm_throughput)} tok/s")
    if run.loss is not None:
        line.append(f"\nloss {run.loss:.3f} ")
        line.append(sparkline(run.loss_trend), style="cyan")
    return line


def _data_line(status: Status) -> Text | None:
    """Data progress and the last evaluation, when the run has them."""
    parts = []
    if status.data is not None:
        d = status.data
        parts.append(f"data epoch {d.epoch}  shards {d.shards_done}/{d.num_shards} done, {d.shards_in_progress} in "
                     f"progress  {d.tokens:,} tokens seen")
    if status.eval is not None:
        parts.append(f"eval loss {status.eval.loss:.3f}  perplexity {status.eval.perplexity:,.2f} (step {status.eval.step})")
    return Text("\n".join(parts)) if parts else None


def _grid(status: Status) -> Table:
    grid = Table(box=box.SIMPLE_HEAD, expand=False, pad_edge=False, title="stages x peers", title_justify="left")
    for name, justify in (("stg", "right"), ("layers", "left"), ("peer", "left"), ("state", "left"),
                          ("tok/s", "right"), ("load", "right"), ("hardware", "left")):
        grid.add_column(name, justify=justify, no_wrap=True)
    peers = {p.peer_id: p for p in status.peers}
    for stage in status.stages:
        hot = stage.index == status.bottleneck_stage
        style = "bold red" if hot else None
        start, end = stage.layers
        label = f"{stage.index}" + ("◀" if hot else "")
        if not stage.peers:
            grid.add_row(label, f"[{start}, {end})", "-", "none", "0", "", "", style="bold red")
        for n, peer_id in enumerate(stage.peers):
            p = peers[peer_id]
            state = "stale" if p.stale else p.state
            name = _short(peer_id) + (" relayed" if p.relay else "")  # behind NAT; the relay's id: --json
            grid.add_row(label if n == 0 else "", f"[{start}, {end})" if n == 0 else "", Text(name), Text(state),
                         _rate(p.throughput), f"{p.load:.0f}", _hardware(p.hardware), style=style)
    return grid


def _marginal(peer: PeerStatus) -> str:
    """What the swarm's throughput would lose without this peer: ``-400 (100%)``, or ``0``."""
    if not peer.marginal:
        return "0"
    return f"-{_rate(peer.marginal)} ({peer.marginal_share:.0%})"


def _contributions(status: Status) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="contribution", title_justify="left")
    for name in ("peer", "tokens", "share", "marginal", "served", "req/s", "ledger"):
        table.add_column(name, justify="left" if name == "peer" else "right", no_wrap=True)
    for p in sorted(status.peers, key=lambda p: -p.tokens):
        table.add_row(Text(_short(p.peer_id)), f"{p.tokens:,}", f"{p.contribution_share:.0%}",
                      _marginal(p), f"{_rate(p.tokens_per_s)}/s", f"{p.requests_per_s:.1f}", str(p.ledger_entries))
    return table


def render_status(status: Status) -> Panel:
    """One frame of the terminal view; fits 80 columns."""
    data = _data_line(status)
    parts: list[Any] = [_run_line(status), *([data] if data is not None else []), _grid(status), _contributions(status)]
    if status.delegations:
        links = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="delegation", title_justify="left")
        links.add_column("delegator")
        links.add_column("computed by")
        links.add_column("stage")
        links.add_column("GPUs")
        for link in status.delegations:
            links.add_row(Text(_short(link.delegator)), Text(_short(link.delegate)), str(link.stage), str(link.gpu_count))
        parts.append(links)
    for warning in status.warnings:
        parts.append(Text(f"! {warning}", style="yellow"))
    model = status.model if len(status.model) <= 40 else "…" + status.model[-39:]
    title = f"[bold]{escape(status.run_id)}[/]: {escape(model)} ({status.num_layers} layers)"
    return Panel(Group(*parts), title=title, title_align="left", width=80)
