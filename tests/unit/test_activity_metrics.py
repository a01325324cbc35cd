"""Request counting through the observed transport, rates, and Prometheus scraped over real HTTP."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from peers.telemetry.activity import Activity, ObservedTransport, RequestDone, work_of
from peers.telemetry.metrics import MetricsServer, NodeMetrics
from peers.telemetry.monitor import GpuSample, HardwareSample
from peers.training.protocol import BackwardRequest
from net.transport import InMemoryTransport
from core.types import LayerRange
from core.errors import BadRequest, ConfigError
from net.rpc import Raw


@pytest.mark.parametrize("method, message, shapes, expected", [
    ("forward", {"stage": 2}, [(4, 16, 8)], (2, 4, 64)),
    ("backward", {"stage": 0}, [(2, 5, 8), (2, 5, 8)], (0, 2, 10)),
    ("info", {}, [], (None, 0, 0)),
    ("forward", "garbage", [(1, 3, 8)], (None, 1, 3)),
    ("forward", {"stage": 1}, [(7,)], (None, 0, 0)),
    ("backward", BackwardRequest(stage=3, layers=LayerRange(start=0, end=1), request_id="r", num_samples=2),
     [(2, 5, 8)], (3, 2, 10)),  # a push hands its own handler the parsed request
])
def test_work_of(method, message, shapes, expected):
    assert work_of(method, message, [torch.zeros(s) for s in shapes]) == expected


def test_rates_over_a_sliding_window():
    now = [0.0]
    activity = Activity(window=10.0, clock=lambda: now[0])
    for t in (1.0, 2.0, 3.0):
        now[0] = t
        activity.started()
        activity.finished(RequestDone("forward", 0.1, True, 0, 1, 100))
    now[0] = 5.0
    assert activity.rates() == (3 / 5, 300 / 5)  # younger than the window: divide by the time so far
    now[0] = 12.5
    assert activity.rates() == (1 / 10, 100 / 10)  # the first two fell out of the window
    assert (activity.tokens, activity.microbatches, activity.in_flight) == (300, 3, 0)


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_observed_handlers_show_up_in_metrics_scraped_over_http():
    activity = Activity()
    metrics = NodeMetrics("peer", "12D3KooWTest", "run1")
    metrics.watch_activity(activity)
    hub = InMemoryTransport()
    transport = ObservedTransport(hub.bind("peer"), activity)
    gate = asyncio.Event()

    async def forward(message, tensors):
        if message.get("fail"):
            raise BadRequest("no")
        await gate.wait()
        return {"ok": {}}, [tensors[0] * 2]

    async def scenario():
        await transport.serve("swarm.stage.forward", forward)
        calls = [asyncio.create_task(hub.call("peer", "swarm.stage.forward", Raw({"stage": 1}), [torch.ones(2, 3, 4)],
                                              timeout=5)) for _ in range(2)]
        await asyncio.sleep(0.05)
        queued = activity.in_flight
        gate.set()
        await asyncio.gather(*calls)
        reply, _ = await hub.call("peer", "swarm.stage.forward", Raw({"stage": 1, "fail": True}), [torch.ones(1, 1, 4)],
                                  timeout=5)
        assert "error" in reply
        return queued

    assert asyncio.run(scenario()) == 2
    metrics.observe_hardware(HardwareSample(0, 37.5, 3.0, 16.0, (GpuSample(0, "g", 81.0, 5.0, 24.0, 66.0, None),)))
    metrics.step.set(7)
    server = MetricsServer(metrics, "127.0.0.1", 0)
    server.start()
    try:
        scraped = _scrape(server.url)
    finally:
        server.stop()
    assert scraped[("swarm_rpc_requests_total", (("method", "forward"), ("outcome", "ok")))] == 2
    assert scraped[("swarm_rpc_requests_total", (("method", "forward"), ("outcome", "error")))] == 1
    assert scraped[("swarm_rpc_latency_seconds_count", (("method", "forward"),))] == 3
    assert scraped[("swarm_tokens_processed_total", (("stage", "1"),))] == 12  # 2 ok calls x 2 x 3 tokens
    assert scraped[("swarm_microbatches_processed_total", (("stage", "1"),))] == 2
    assert scraped[("swarm_queue_depth", ())] == 0 and scraped[("swarm_step", ())] == 7
    assert scraped[("swarm_cpu_percent", ())] == 37.5 and scraped[("swarm_ram_used_bytes", ())] == 3 * 2**30
    assert scraped[("swarm_gpu_utilization_percent", (("gpu", "0"),))] == 81.0
    assert ("swarm_gpu_power_watts", (("gpu", "0"),)) not in scraped  # not reported by this GPU
    assert scraped[("swarm_node_info", (("peer_id", "12D3KooWTest"), ("role", "peer"), ("run", "run1")))] == 1
    with pytest.raises(OSError):  # stopped: the port is closed
        urllib.request.urlopen(server.url, timeout=2)


def test_a_port_in_use_is_a_config_error():
    first = MetricsServer(NodeMetrics("peer", "a", "r"), "127.0.0.1", 0)
    port = first.start()
    try:
        with pytest.raises(ConfigError, match=f"cannot serve /metrics on 127.0.0.1:{port}"):
            MetricsServer(NodeMetrics("peer", "b", "r"), "127.0.0.1", port).start()
    finally:
        first.stop()
