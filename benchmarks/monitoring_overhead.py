"""What monitoring costs a serving peer: the same forward+backward requests served by one stage
(a) registered straight on the transport and (b) through ``ObservedTransport`` with Prometheus and
the contribution ledger listening, interleaved in rounds in one run. Prints requests/s of both, their
median ratio, and the time of one hardware sample.

    .venv/bin/python benchmarks/monitoring_overhead.py            # GPT-2 stage of 2 layers x 64, batch 2 x 32
"""

from __future__ import annotations

import harness  # noqa: F401  (before any project module: this checkout first on sys.path)

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch

from dht.schemas import OptimizerSettings
from peers.telemetry.activity import Activity, ObservedTransport
from peers.training.client import StageClient
from peers.accounting.contribution import ContributionRecorder
from peers.training.executor import StageExecutor
from peers.accounting.ledger import LedgerWriter
from peers.telemetry.metrics import NodeMetrics
from peers.telemetry.monitor import HardwareMonitor
from peers.training.service import StageService
from net.transport import InMemoryTransport
from shards.source import resolve_model
from shards.stage import load_stage
from shards.tiny import make_tiny_model
from core.types import LayerRange


async def _serve(hub: InMemoryTransport, name: str, module: torch.nn.Module, observed: bool, tmp: Path):
    layers = LayerRange(start=0, end=2)
    executor = StageExecutor(module, 0, layers, OptimizerSettings())  # steps only when asked: never here
    service = StageService(executor, name)
    transport = hub.bind(name)
    if observed:
        from hivemind.utils.crypto import RSAPrivateKey

        activity = Activity()
        NodeMetrics("peer", name, "bench").watch_activity(activity)
        writer = LedgerWriter(tmp / f"{name}.jsonl", key=RSAPrivateKey(), run_id="bench", peer_id=name)
        activity.listeners.append(ContributionRecorder(writer, window=30, step_of=lambda s: 0).observe)
        transport = ObservedTransport(transport, activity)
    await service.register(transport)
    return service


async def _round(client: StageClient, peer: str, requests: int, batch: int, seq: int, hidden: int) -> float:
    layers = LayerRange(start=0, end=2)
    started = time.perf_counter()
    for i in range(requests):
        x = torch.randn(batch, seq, hidden)
        inputs = (x, None, None)
        request_id = uuid.uuid4().hex  # fresh: a stage replays the reply of a backward id it has seen
        out, _ = await client.forward(peer, 0, layers, request_id, inputs, train=True, seed=i)
        await client.backward(peer, 0, layers, request_id, torch.ones_like(out), inputs, num_samples=batch, seed=i)
    return requests * 2 / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_tiny_model(tmp / "model", "gpt2", num_layers=2, hidden_size=args.hidden, num_heads=4)
        source = resolve_model(str(model_dir))
        hub = InMemoryTransport()
        plain = await _serve(hub, "plain", load_stage(source, LayerRange(start=0, end=2)), False, tmp)
        watched = await _serve(hub, "watched", load_stage(source, LayerRange(start=0, end=2)), True, tmp)
        client = StageClient(hub, timeout=60)
        await _round(client, "plain", 5, args.batch, args.seq, args.hidden)  # warm up both
        await _round(client, "watched", 5, args.batch, args.seq, args.hidden)
        ratios = []
        for r in range(args.rounds):
            a = await _round(client, "plain", args.requests, args.batch, args.seq, args.hidden)
            b = await _round(client, "watched", args.requests, args.batch, args.seq, args.hidden)
            ratios.append(b / a)
            print(f"round {r + 1}: plain {a:,.1f} req/s, monitored {b:,.1f} req/s, ratio {b / a:.3f}")
        print(f"median ratio monitored/plain: {statistics.median(ratios):.3f} over {args.rounds} rounds "
              f"of {args.requests} forward+backward pairs (batch {args.batch}x{args.seq}, hidden {args.hidden})")
        plain.shutdown()
        watched.shutdown()
    monitor = HardwareMonitor()
    started = time.perf_counter()
    for _ in range(50):
        monitor.sample()
    print(f"one hardware sample (psutil, no GPU here): {(time.perf_counter() - started) / 50 * 1e3:.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    asyncio.run(main(parser.parse_args()))
