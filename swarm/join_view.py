"""What `swarm join` tells its owner once the peer serves: who it is, the line to share, whether
others can reach it, which stage it took and why; then one live line until Ctrl+C."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.live import Live
from rich.text import Text

from peers.joining.reachability import probe_reachability
from peers.server import Peer
from core.config import SwarmSettings
from core.types import StageIndex
from swarm.status_view import describe_device

__all__ = ["introduce", "live_lines", "format_live_line", "key_fingerprint", "describe_span", "span_label",
           "device_line"]

REACH_TIMEOUT = 10.0


def key_fingerprint(public_key: bytes) -> str:
    """A short, stable name for a signing key: ``sha256:`` and 16 hex digits."""
    return "sha256:" + hashlib.sha256(public_key).hexdigest()[:16]


def span_label(stages: list[StageIndex]) -> str:
    """``stage 2`` or ``stages 2-3`` (what the peer serves, in the words of ``--stage``)."""
    if len(stages) == 1:
        return f"stage {stages[0]}"
    return f"stages {stages[0]}-{stages[-1]}"


def describe_span(peer: Peer) -> str:
    """``stage 1 (layers [2, 4))`` or ``stages 0-1 (layers [0, 4))``."""
    records = [slot.record for slot in peer.slots.values()]
    return f"{span_label(peer.stages)} (layers [{records[0].layers.start}, {records[-1].layers.end}))"


def format_live_line(stage: StageIndex | str, requests_per_s: float, tokens_per_s: float, tokens: int, microbatches: int,
                     ledger_entries: int, queue: int, device: str | None = None) -> str:
    """The compact live line: rates now, contribution so far (``stage`` may be a span like ``"0-1"``),
    and where it computes (``device``: its GPU's live figures, or ``cpu (no GPU)``)."""
    label = f"stage {stage}" if isinstance(stage, int) else f"stages {stage}"
    line = (f"{label} | {requests_per_s:.1f} req/s | {tokens_per_s:,.0f} tok/s | queue {queue} | "
            f"contributed {tokens:,} tokens in {microbatches:,} microbatches | ledger {ledger_entries}")
    return line if device is None else f"{line} | {device}"


async def introduce(peer: Peer, settings: SwarmSettings, console: Console) -> None:
    """Identity, the join line, the reachability verdict and the stage with its reason."""
    key = peer.dht.signing_key.get_public_key().to_bytes()
    maddrs = peer.maddrs
    run = "" if settings.run_id == "swarm" else f" --run {settings.run_id}"
    console.print(f"[bold]identity[/]  peer {escape(peer.peer_id)}  key {escape(key_fingerprint(key))}")
    if maddrs:
        console.print("[bold]share[/]     others can join through this peer too:")
        print(f"swarm join --bootstrap {maddrs[0]}{run}", flush=True)
    with console.status("checking whether other peers can reach this one..."):
        verdict = await probe_reachability(maddrs, timeout=REACH_TIMEOUT, initial_peers=settings.network.initial_peers)
    mark = "[green]ok[/]" if verdict.reachable else "[red]!![/]"
    console.print(f"[bold]reach[/]     {mark} {escape(verdict.text)}", highlight=False)
    if verdict.fix:
        console.print(f"          fix: {verdict.fix}", highlight=False, markup=False)
    if len(peer.stages) == 1:
        record = peer.record
        console.print(f"[bold]stage[/]     {record.stage} (layers {record.layers}): {escape(peer.claim_reason)}",
                      highlight=False)
    else:
        console.print(f"[bold]stages[/]    {escape(describe_span(peer)[len('stages '):])}: {escape(peer.claim_reason)}",
                      highlight=False)
    console.print(f"[bold]device[/]    {escape(device_line(peer))}", highlight=False)
    if peer.telemetry is not None and peer.telemetry.server is not None:
        console.print(f"[bold]metrics[/]   {escape(peer.telemetry.server.url)}")


def device_line(peer: Peer) -> str:
    """Where the peer computes and in what precision: ``cuda:0 (NVIDIA H100), bfloat16 under autocast,
    float32 weights and AdamW state (AdamW in host memory)``, or ``cpu (no GPU), float32``."""
    hardware = peer.telemetry.hardware() if peer.telemetry is not None else None
    name = hardware.gpu_name if hardware is not None and peer.device.type == "cuda" else None
    where = f"{peer.device} ({name})" if name else ("cpu (no GPU)" if peer.device.type == "cpu" else str(peer.device))
    dtype = peer.manifest.dtype if peer.manifest is not None else "float32"
    precision = "float32" if dtype == "float32" else f"{dtype} under autocast, float32 weights and AdamW state"
    return f"{where}, {precision}" + (" (AdamW in host memory)" if peer.offload_optimizer else "")


def _line(peer: Peer) -> str:
    telemetry = peer.telemetry
    requests_per_s, tokens_per_s = telemetry.activity.rates()
    entries = len(telemetry.recorder.writer.entries) if telemetry.recorder else 0
    stages = peer.stages
    label = stages[0] if len(stages) == 1 else f"{stages[0]}-{stages[-1]}"
    return format_live_line(label, requests_per_s, tokens_per_s, telemetry.activity.tokens,
                            telemetry.activity.microbatches, entries, telemetry.activity.in_flight,
                            device=describe_device(telemetry.hardware()))


async def live_lines(peer: Peer, console: Console, stop: asyncio.Event, *, interval: float,
                     extra: Callable[[], str] | None = None) -> None:
    """Until ``stop``: one line rewritten in place on a terminal, else one printed line per ``interval``;
    ``extra()`` adds a second line (a delegate's sessions)."""

    def text() -> str:
        return _line(peer) + (f"\n{extra()}" if extra is not None else "")

    if console.is_terminal:
        with Live(Text(text()), console=console, refresh_per_second=2, transient=False) as live:
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), min(interval, 1.0))
                live.update(Text(text()))
        return
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        console.print(text(), highlight=False)
