"""``PeerTelemetry``: everything a serving peer tells about itself, in one place with one lifecycle.

* a ``HardwareMonitor`` (every ``monitor.interval`` s) whose summary goes into the peer's record;
* an ``Activity`` fed by the transport wrapper every handler is registered through;
* Prometheus ``/metrics`` when ``monitor.metrics_port`` is set;
* the signed contribution ledger (``ContributionRecorder``) in ``<state_dir>/<run>/ledger``;
* its ``MetricsRecord`` under ``{run}_telemetry`` every ``monitor.interval`` s (rates, totals).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from hivemind.utils import get_dht_time

from dht.records import SwarmDHT
from dht.schemas import HardwareSummary, MetricsRecord, MetricsRole, PeerRecord
from peers.telemetry.activity import Activity, ObservedTransport
from peers.accounting.contribution import ContributionRecorder, bootstrap_peer_ids
from peers.telemetry.hardware import nvml_index, probe_hardware
from shards.devices import resolve_device
from peers.accounting.ledger import LedgerWriter
from peers.telemetry.health import Checks
from peers.telemetry.metrics import MetricsServer, NodeMetrics
from peers.telemetry.monitor import HardwareMonitor
from net.transport import Transport
from core.loop import cancel_and_wait
from core.config import SwarmSettings
from core.types import StageIndex

__all__ = ["PeerTelemetry"]

logger = logging.getLogger(__name__)


class PeerTelemetry:
    """Hardware, activity, metrics and ledger of one peer. ``stop()`` is idempotent."""

    def __init__(self, settings: SwarmSettings, dht: SwarmDHT, *, nvml: object | None = None):
        self.settings, self.dht = settings, dht
        mon = settings.monitor
        device = resolve_device(settings.peer.device)
        gpu = nvml_index(device)
        self.monitor = HardwareMonitor(interval=mon.interval, history=mon.history, nvml=nvml,
                                       served=() if gpu is None else (gpu,))
        self.activity = Activity()
        self.metrics = NodeMetrics("peer", dht.peer_id, settings.run_id)
        self.metrics.watch_activity(self.activity)
        self.metrics.watch_hardware(self.monitor)
        self.server: MetricsServer | None = None
        self.recorder: ContributionRecorder | None = None
        self._static = probe_hardware(device)
        self._step_of: Callable[[int], int] = lambda stage: 0
        self._stages: list[int] = []
        self._task: asyncio.Task | None = None

    def start_monitor(self, checks: Checks | None = None) -> None:
        """Sample hardware from now on and serve /metrics, /health and /ready with ``checks`` (before the
        stage loads: a slow load shows, and /ready says not ready until it is done)."""
        self.monitor.start()
        if self.settings.monitor.metrics_port is not None and self.server is None:
            self.server = MetricsServer(self.metrics, self.settings.monitor.metrics_host,
                                        self.settings.monitor.metrics_port, checks=checks)
            self.server.start()

    def observe(self, transport: Transport) -> ObservedTransport:
        """The transport to register handlers on, so every request is counted."""
        return ObservedTransport(transport, self.activity)

    def start_serving(self, stages: list[StageIndex], step_of: Callable[[int], int], transport: Transport, *,
                      counts: Callable[[int], bool] = lambda stage: True) -> None:
        """The stage is served: start the ledger (of the stages ``counts`` says are this peer's own
        work) and the metrics record."""
        self._stages, self._step_of = list(stages), step_of
        self.metrics.step.set_function(lambda: max((step_of(s) for s in self._stages), default=0))
        path = (self.settings.state_dir.expanduser() / self.settings.run_id / "ledger" / f"{self.dht.peer_id}.jsonl")
        writer = LedgerWriter(path, key=self.dht.signing_key, run_id=self.settings.run_id, peer_id=self.dht.peer_id)
        self.recorder = ContributionRecorder(
            writer, window=self.settings.monitor.ledger_window, step_of=step_of, transport=transport,
            bootstrap_ids=bootstrap_peer_ids(self.settings.network.initial_peers), counts=counts,
        )
        self.activity.listeners.append(self.recorder.observe)
        self.recorder.start()
        self._task = asyncio.create_task(self._publish_forever(), name="peer-metrics-record")

    def follow_stage(self, stage: StageIndex) -> None:
        """The peer moved to ``stage``: the step gauge and the metrics record follow it (in place: the
        step gauge reads this list)."""
        self.follow_stages([stage])

    def follow_stages(self, stages: list[StageIndex]) -> None:
        """The peer moved to the span ``stages`` (see ``follow_stage``)."""
        self._stages[:] = list(stages)

    def hardware(self) -> HardwareSummary:
        return self.monitor.summary(self._static)

    def refresh(self, record: PeerRecord) -> PeerRecord:
        """``record`` with the current hardware summary, load and time (before each announce)."""
        return record.model_copy(update={"hardware": self.hardware(), "load": float(self.activity.in_flight),
                                         "updated": get_dht_time()})

    def metrics_record(self) -> MetricsRecord:
        requests_per_s, tokens_per_s = self.activity.rates()
        self.metrics.tokens_per_second.set(tokens_per_s)
        return MetricsRecord(
            role=MetricsRole.PEER, peer_id=self.dht.peer_id, updated=get_dht_time(),
            step=max((self._step_of(s) for s in self._stages), default=0),
            tokens_per_s=round(tokens_per_s, 1), requests_per_s=round(requests_per_s, 2),
            tokens=self.activity.tokens, microbatches=self.activity.microbatches,
            ledger_entries=len(self.recorder.writer.entries) if self.recorder else 0, stages=self._stages,
        )

    async def _publish_forever(self) -> None:
        while True:
            try:
                await self.dht.publish_telemetry(self.metrics_record())
            except Exception as e:  # a DHT hiccup: the next round publishes again
                logger.warning("publishing the metrics record failed: %s", e)
            await asyncio.sleep(self.settings.monitor.interval)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self.recorder is not None:
            await self.recorder.stop()
        await self.monitor.stop()
        if self.server is not None:
            self.server.stop()
