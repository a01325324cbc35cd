"""``TrainerReporter``: a trainer's step, loss trend and tokens/s, published for `swarm status`.

    with TrainerReporter(model, MonitorSettings()) as reporter:
        for step ...:
            reporter.report(step, loss.item(), tokens=input_ids.numel())

Every ``interval`` seconds (and on the first report) it writes a ``MetricsRecord`` (role trainer)
under ``{run}_telemetry`` without blocking the training loop, and it keeps the trainer's Prometheus
gauges (step, loss, tokens/s, hardware) current for ``/metrics`` when ``metrics_port`` is set.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Coroutine

from hivemind.utils import get_dht_time

from dht.records import SwarmDHT
from dht.schemas import LOSS_TREND_LEN, MetricsRecord, MetricsRole
from peers.telemetry.activity import Activity, ObservedTransport
from peers.telemetry.metrics import MetricsServer, NodeMetrics
from peers.telemetry.monitor import HardwareMonitor
from core.config import MonitorSettings

__all__ = ["TrainerReporter"]

logger = logging.getLogger(__name__)


class TrainerReporter:
    """Publishes one trainer's progress; ``close()`` is idempotent."""

    def __init__(self, dht: SwarmDHT, submit: Callable[[Coroutine[Any, Any, Any]], Future],
                 settings: MonitorSettings | None = None, *, clock: Callable[[], float] = time.monotonic):
        self.dht, self._submit = dht, submit
        self.settings = settings or MonitorSettings()
        self.metrics = NodeMetrics("trainer", dht.peer_id, dht.run_id)
        self.monitor = HardwareMonitor(interval=self.settings.interval, history=self.settings.history)
        self.metrics.watch_hardware(self.monitor)
        self.calls = Activity()
        self.metrics.watch_calls(self.calls)
        self.server: MetricsServer | None = None
        if self.settings.metrics_port is not None:
            self.server = MetricsServer(self.metrics, self.settings.metrics_host, self.settings.metrics_port)
            self.server.start()
        self.losses: deque[float] = deque(maxlen=LOSS_TREND_LEN)
        self._clock = clock
        self._started = clock()
        self._tokens = 0
        self._last_publish: float | None = None
        self._pending: Future | None = None
        self._latest: tuple[int, float] | None = None
        self._published_step = -1

    @classmethod
    def for_model(cls, model: Any, settings: MonitorSettings | None = None) -> "TrainerReporter":
        """For a ``SwarmModelForCausalLM`` (its DHT node and event loop); its stage calls are counted
        and timed per RPC from now on."""
        reporter = cls(model.dht, model.submit, settings)
        client = model.pipeline.client
        client.transport = ObservedTransport(client.transport, reporter.calls, calls=reporter.calls)
        return reporter

    def report(self, step: int, loss: float, tokens: int) -> None:
        """After each optimizer step: ``step`` done, its ``loss``, ``tokens`` it trained on."""
        self._tokens += tokens
        self.losses.append(float(loss))
        rate = self._tokens / max(self._clock() - self._started, 1e-9)
        self.metrics.step.set(step)
        self.metrics.loss.set(loss)
        self.metrics.tokens_per_second.set(rate)
        self.metrics.tokens.labels("").inc(tokens)
        self._latest = (step, rate)
        now = self._clock()
        if self._last_publish is None or now - self._last_publish >= self.settings.interval:
            self._last_publish = now
            self.monitor.sample()
            self._publish(self.record(step, rate))

    def record(self, step: int, tokens_per_s: float) -> MetricsRecord:
        return MetricsRecord(
            role=MetricsRole.TRAINER, peer_id=self.dht.peer_id, updated=get_dht_time(), step=step,
            loss=round(self.losses[-1], 5), loss_trend=[round(x, 4) for x in self.losses],
            tokens_per_s=round(tokens_per_s, 1), tokens=self._tokens,
        )

    def _publish(self, record: MetricsRecord) -> None:
        if self._pending is not None and not self._pending.done():
            return  # the DHT is slow: skip this round rather than queue stores behind each other
        self._published_step = record.step
        self._pending = self._submit(self.dht.publish_telemetry(record))

    def flush(self, timeout: float = 10.0) -> None:
        """Wait (bounded) for the last publication, so a short run's record is in the DHT."""
        if self._pending is not None:
            try:
                self._pending.result(timeout)
            except Exception as e:  # a store that failed or timed out: the record is only missing
                logger.warning("publishing the trainer's metrics failed: %s", e)

    def close(self) -> None:
        """Publish the last step if it was not yet, wait for it (bounded), stop /metrics."""
        self.flush()
        if self._latest is not None and self._latest[0] != self._published_step:
            self._publish(self.record(*self._latest))
            self.flush()
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.monitor.close()

    def __enter__(self) -> "TrainerReporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

