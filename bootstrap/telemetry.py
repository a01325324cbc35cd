"""``BootstrapTelemetry``: the bootstrap's ledger service, hardware monitor and Prometheus endpoint.

The ledger RPCs are served on the bootstrap's own P2P daemon; every accepted entry updates the
``swarm_ledger_*`` gauges, so a Prometheus scrape of the bootstrap shows each peer's verified
contribution beside the RPC counts and hardware gauges every node has.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from prometheus_client import Gauge

from bootstrap.ledger import LedgerBook, LedgerService
from dht.records import SwarmDHT
from net.admission import CallerLimits, Gate
from peers.telemetry.activity import Activity, ObservedTransport, RequestDone
from peers.telemetry.metrics import MetricsServer, NodeMetrics
from peers.telemetry.monitor import HardwareMonitor
from net.transport import P2PTransport
from core.config import SwarmSettings

__all__ = ["BootstrapTelemetry"]

logger = logging.getLogger(__name__)


class BootstrapTelemetry:
    """Start after the DHT is up; ``stop()`` is idempotent."""

    def __init__(self, settings: SwarmSettings, dht: SwarmDHT, state_dir: Path, *,
                 cap: Callable[[str], int] | None = None, audit: Callable[[str, str, str], None] | None = None):
        """``cap`` and ``audit``: the ledger book's credit cap and audit log (``LedgerBook``)."""
        self.settings, self.dht = settings, dht
        self.book = LedgerBook(state_dir / "ledger.jsonl", cap=cap, audit=audit)
        self.activity = Activity()
        self.metrics = NodeMetrics("bootstrap", dht.peer_id, settings.run_id)
        self.metrics.watch_activity(self.activity)
        self.monitor = HardwareMonitor(interval=settings.monitor.interval, history=settings.monitor.history)
        self.metrics.watch_hardware(self.monitor)
        r = self.metrics.registry
        self.ledger_tokens = Gauge("swarm_ledger_tokens", "verified tokens per peer", ["peer"], registry=r)
        self.ledger_microbatches = Gauge("swarm_ledger_microbatches", "verified microbatches per peer", ["peer"],
                                         registry=r)
        self.ledger_entries = Gauge("swarm_ledger_entries", "ledger entries held", registry=r)
        self.activity.listeners.append(self._on_request)
        self._transport: P2PTransport | None = None
        self.server: MetricsServer | None = None

    async def start(self, *, gate: Gate | None = None, limits: CallerLimits | None = None) -> None:
        """Serve the ledger (behind the run's ``gate`` on a keyed run) and start the monitor."""
        self.monitor.start()
        self._update_ledger_gauges()
        self._transport = P2PTransport(await self.dht.dht.replicate_p2p(), gate=gate, limits=limits)
        await LedgerService(self.book).register(ObservedTransport(self._transport, self.activity))
        if self.settings.monitor.metrics_port is not None:
            self.server = MetricsServer(self.metrics, self.settings.monitor.metrics_host,
                                        self.settings.monitor.metrics_port)
            self.server.start()

    def _on_request(self, done: RequestDone) -> None:
        if done.method == "submit" and done.ok:
            self._update_ledger_gauges()

    def _update_ledger_gauges(self) -> None:
        self.ledger_entries.set(len(self.book.entries))
        for peer, row in self.book.tally().items():
            self.ledger_tokens.labels(peer).set(row["tokens"])
            self.ledger_microbatches.labels(peer).set(row["microbatches"])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        await self.monitor.stop()
        if self._transport is not None:
            await self._transport.close()
            self._transport = None
