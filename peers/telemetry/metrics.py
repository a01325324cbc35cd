"""Prometheus metrics of one swarm node (peer, trainer or bootstrap) and its HTTP endpoint: ``/metrics``,
plus ``/health`` and ``/ready`` (``peers.telemetry.health``).

Each node has a registry of its own (not prometheus-client's process-wide one), so several nodes in
one process, as in tests, never share or clash on a metric. The figures come from the node's
``Activity`` (requests, latency, tokens, queue), its ``HardwareMonitor`` and, for trainers and the
bootstrap, from explicit ``set_*`` calls.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

from peers.telemetry.activity import Activity, RequestDone
from peers.telemetry.health import Checks, wsgi_health
from peers.telemetry.monitor import HardwareMonitor, HardwareSample
from core.errors import ConfigError
from core.types import PeerId

__all__ = ["NodeMetrics", "MetricsServer"]

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class NodeMetrics:
    """The metrics of one node, in a registry of its own."""

    def __init__(self, role: str, peer_id: PeerId, run_id: str):
        self.registry = r = CollectorRegistry()
        Info("swarm_node", "what this node is", registry=r).info({"role": role, "peer_id": peer_id, "run": run_id})
        self.requests = Counter("swarm_rpc_requests", "RPC requests served (a trainer: made), by method and outcome",
                                ["method", "outcome"], registry=r)
        self.latency = Histogram("swarm_rpc_latency_seconds", "time to serve one RPC request", ["method"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("swarm_tokens_processed", "tokens through forward or backward", ["stage"], registry=r)
        self.microbatches = Counter("swarm_microbatches_processed", "forward/backward microbatches served",
                                    ["stage"], registry=r)
        self.queue_depth = Gauge("swarm_queue_depth", "requests in flight or waiting for the compute thread",
                                 registry=r)
        self.step = Gauge("swarm_step", "optimizer step (a stage's, or the trainer's training step)", registry=r)
        self.loss = Gauge("swarm_loss", "last training loss (trainers)", registry=r)
        self.tokens_per_second = Gauge("swarm_tokens_per_second", "tokens processed or trained per second",
                                       registry=r)
        self._hardware_gauges(r)

    def _hardware_gauges(self, r: CollectorRegistry) -> None:
        self.cpu_percent = Gauge("swarm_cpu_percent", "CPU use of the whole machine", registry=r)
        self.ram_used = Gauge("swarm_ram_used_bytes", "RAM in use on the machine", registry=r)
        self.ram_total = Gauge("swarm_ram_total_bytes", "RAM of the machine", registry=r)
        self.gpu_util = Gauge("swarm_gpu_utilization_percent", "GPU utilisation", ["gpu"], registry=r)
        self.gpu_memory_used = Gauge("swarm_gpu_memory_used_bytes", "GPU memory in use", ["gpu"], registry=r)
        self.gpu_memory_total = Gauge("swarm_gpu_memory_total_bytes", "GPU memory", ["gpu"], registry=r)
        self.gpu_temperature = Gauge("swarm_gpu_temperature_celsius", "GPU temperature", ["gpu"], registry=r)
        self.gpu_power = Gauge("swarm_gpu_power_watts", "GPU power draw", ["gpu"], registry=r)

    def watch_activity(self, activity: Activity) -> None:
        """Count every request ``activity`` sees; report its in-flight count as the queue depth."""
        activity.listeners.append(self.observe_request)
        self.queue_depth.set_function(lambda: activity.in_flight)

    def watch_calls(self, activity: Activity) -> None:
        """A trainer's outgoing calls: counts and latency per RPC (the tokens it trained on are
        reported by the trainer itself, not once per stage call)."""
        activity.listeners.append(self.observe_call)
        self.queue_depth.set_function(lambda: activity.in_flight)

    def observe_call(self, done: RequestDone) -> None:
        self.requests.labels(done.method, "ok" if done.ok else "error").inc()
        self.latency.labels(done.method).observe(done.seconds)

    def watch_hardware(self, monitor: HardwareMonitor) -> None:
        monitor.listeners.append(self.observe_hardware)
        if monitor.history:
            self.observe_hardware(monitor.history[-1])

    def observe_request(self, done: RequestDone) -> None:
        self.requests.labels(done.method, "ok" if done.ok else "error").inc()
        self.latency.labels(done.method).observe(done.seconds)
        if done.ok and done.tokens:
            stage = str(done.stage) if done.stage is not None else ""
            self.tokens.labels(stage).inc(done.tokens)
            self.microbatches.labels(stage).inc()

    def observe_hardware(self, sample: HardwareSample) -> None:
        self.cpu_percent.set(sample.cpu_percent)
        self.ram_used.set(sample.ram_used_gib * 2**30)
        self.ram_total.set(sample.ram_total_gib * 2**30)
        for gpu in sample.gpus:
            label = str(gpu.index)
            self.gpu_memory_used.labels(label).set(gpu.memory_used_gib * 2**30)
            self.gpu_memory_total.labels(label).set(gpu.memory_total_gib * 2**30)
            for gauge, value in ((self.gpu_util, gpu.util_percent), (self.gpu_temperature, gpu.temperature_c),
                                 (self.gpu_power, gpu.power_w)):
                if value is not None:
                    gauge.labels(label).set(value)


class MetricsServer:
    """``/metrics``, ``/health`` and ``/ready`` over HTTP for one registry, on a daemon thread;
    ``stop()`` closes the socket. ``checks``: the node's readiness checks (settable later, as the
    node's parts come up); none: ``/ready`` says ready once it answers."""

    def __init__(self, metrics: NodeMetrics, host: str, port: int, *, checks: Checks | None = None):
        self.metrics, self.host, self.requested_port = metrics, host, port
        self.checks = checks
        self.port: int | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def _app(self):
        metrics_app = make_wsgi_app(self.metrics.registry)

        def app(environ, start_response):
            answer = wsgi_health(environ.get("PATH_INFO", ""), self.checks)
            if answer is None:
                return metrics_app(environ, start_response)
            start_response(answer[0], [("Content-Type", "application/json"), ("Content-Length", str(len(answer[1])))])
            return [answer[1]]

        return app

    def start(self) -> int:
        try:
            self._server = make_server(self.host, self.requested_port, self._app(), ThreadingWSGIServer,
                                       handler_class=_SilentHandler)
        except OSError as e:  # a port in use or an address this machine does not have
            raise ConfigError(f"cannot serve /metrics on {self.host}:{self.requested_port}: {e.strerror}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        self.port = self._server.server_address[1]
        logger.info("Prometheus metrics at http://%s:%d/metrics", self.host, self.port)
        return self.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None
