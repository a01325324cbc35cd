"""Monitoring over real hivemind DHT/P2P on loopback: a trainer trains through 2 stages (stage 0 with
two replicas), then the status built from the DHT, each node's /metrics scraped over HTTP, the
ledger the bootstrap received and tallied, and the reachability probe are checked."""

from __future__ import annotations

import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from dht.records import SwarmDHT
from peers.accounting.ledger import verify_entries
from peers.joining.reachability import probe_reachability
from core.config import MonitorSettings
from swarm.ledger_cli import fetch_ledger
from trainer.pipeline import FaultPolicy
from trainer.reporting import TrainerReporter
from peers.telemetry.status import collect_status
from swarm.status_view import render_status

pytestmark = pytest.mark.slow


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _wait(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_status_metrics_and_ledger_of_a_training_swarm(model_factory, swarm_factory, monkeypatch, tmp_path):
    monkeypatch.setenv("SWARM_MONITOR__INTERVAL", "0.5")
    monkeypatch.setenv("SWARM_MONITOR__LEDGER_WINDOW", "1")
    monkeypatch.setenv("SWARM_MONITOR__METRICS_PORT", "0")
    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4)
    swarm = swarm_factory(model_dir, num_stages=2, num_peers=3, target_batch_size=2)
    by_stage = {0: [p for p in swarm.peers if p.record.stage == 0], 1: [p for p in swarm.peers if p.record.stage == 1]}
    assert len(by_stage[0]) == 2 and len(by_stage[1]) == 1

    # no spot checks: they would add forwards to the exact call counts checked here (tested on their own)
    with swarm.client(policy=FaultPolicy(spot_check_rate=0.0)) as remote:
        with TrainerReporter.for_model(remote, MonitorSettings(interval=0.01, metrics_port=0)) as reporter:
            ids = torch.randint(0, 8, (2, 8), generator=torch.Generator().manual_seed(0))
            for step in range(1, 5):
                loss = remote(ids, labels=ids).loss
                loss.backward()
                reporter.report(step, loss.item(), ids.numel())
            trainer_metrics = _scrape(reporter.server.url)
        assert trainer_metrics[("swarm_step", ())] == 4
        assert trainer_metrics[("swarm_loss", ())] == pytest.approx(reporter.losses[-1])
        assert trainer_metrics[("swarm_tokens_processed_total", (("stage", ""),))] == 4 * 16
        # its calls, per RPC: 4 steps, a push and a collect each way (the peers pass the hops on)
        assert trainer_metrics[("swarm_rpc_requests_total", (("method", "push"), ("outcome", "ok")))] == 8
        assert trainer_metrics[("swarm_rpc_latency_seconds_count", (("method", "collect"),))] == 8
        assert ("swarm_rpc_requests_total", (("method", "forward"), ("outcome", "ok"))) not in trainer_metrics

        def fresh_status():
            status = swarm.loop.run(collect_status(remote.dht))
            served = sum(p.tokens for p in status.peers)
            return status if status.run.step == 4 and served >= 2 * 4 * 16 * 2 else None

        model = _wait(fresh_status, what="trainer and peer metrics records in the DHT")
        status = model.model_dump()

    assert status["run"]["state"] == "training" and status["run"]["trainers"] == 1
    assert status["run"]["loss_trend"] == pytest.approx(list(reporter.losses), abs=1e-4)
    assert status["stages"][0]["online"] == 2 and status["stages"][1]["online"] == 1
    assert status["bottleneck_stage"] == (0 if status["stages"][0]["throughput"] <= status["stages"][1]["throughput"]
                                          else 1)
    peers = {p["peer_id"]: p for p in status["peers"]}
    only = by_stage[1][0].peer_id
    assert peers[only]["marginal"] == status["swarm_throughput"] > 0  # without it, nothing runs
    # every microbatch crossed stage 1 twice (forward and backward): 4 steps x 16 tokens x 2
    assert peers[only]["tokens"] == 4 * 16 * 2 and peers[only]["microbatches"] == 8
    assert sum(peers[p.peer_id]["tokens"] for p in by_stage[0]) == 4 * 16 * 2
    assert peers[only]["hardware"]["ram_used_gib"] > 0 and peers[only]["hardware"]["gpu_count"] == 0
    assert any("stage 1 has one replica" in w for w in status["warnings"])
    assert "stages x peers" in str(render_status(model).renderable.renderables[1].title)

    # a peer's /metrics: its RPCs, tokens, step and hardware
    peer = by_stage[1][0]
    scraped = _scrape(peer.telemetry.server.url)
    assert scraped[("swarm_rpc_requests_total", (("method", "forward"), ("outcome", "ok")))] == 4
    assert scraped[("swarm_rpc_requests_total", (("method", "backward"), ("outcome", "ok")))] == 4
    assert scraped[("swarm_tokens_processed_total", (("stage", "1"),))] == 4 * 16 * 2
    assert scraped[("swarm_step", ())] == 4  # the stage steps every 2 sequences: once per backward here
    assert scraped[("swarm_ram_total_bytes", ())] > 0 and scraped[("swarm_queue_depth", ())] == 0

    # the ledger: each peer's windows, signed, reached the bootstrap, which tallied them
    boot = swarm.bootstrap.telemetry
    _wait(lambda: sum(r["tokens"] for r in boot.book.tally().values()) == 4 * 16 * 2 * 2, what="ledger entries")
    assert boot.book.tally()[only]["tokens"] == 4 * 16 * 2
    boot_metrics = _scrape(boot.server.url)
    assert boot_metrics[("swarm_ledger_tokens", (("peer", only),))] == 4 * 16 * 2
    assert boot_metrics[("swarm_rpc_requests_total", (("method", "submit"), ("outcome", "ok")))] >= len(boot.book.tally())

    dht = SwarmDHT.create_client("test", swarm.initial_peers)
    try:
        fetched = swarm.loop.run(fetch_ledger(dht, swarm.bootstrap.dht.peer_id))
        unreachable = swarm.loop.run(probe_reachability([swarm.initial_peers[0].replace(
            swarm.bootstrap.dht.peer_id, dht.peer_id).replace(swarm.initial_peers[0].split("/")[4], "9")],
            timeout=5))
        reachable = swarm.loop.run(probe_reachability(peer.maddrs, timeout=10))
    finally:
        dht.shutdown()
    assert verify_entries(fetched).ok and fetched == boot.book.entries and len(fetched) >= 2  # a chain per busy peer
    assert reachable.reachable and "this machine only" in reachable.text
    assert not unreachable.reachable and "NOT reachable" in unreachable.text
