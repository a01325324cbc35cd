"""Stage state costs, side by side in one run on loopback: how long a checkpoint holds the compute
thread (the state copy), writing the checkpoint files, and downloading the state from a replica over
real hivemind P2P (what a joining replica waits for). Prints each figure and the MB/s.

    .venv/bin/python benchmarks/state_transfer.py                    # GPT-2 4 layers x 512, one stage
    .venv/bin/python benchmarks/state_transfer.py --hidden 1024 --rounds 5
"""

from __future__ import annotations

import harness  # noqa: F401  (before any project module: this checkout first on sys.path)

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dht.records import SwarmDHT
from peers.state.checkpoint_files import CheckpointDir
from peers.training.client import StageClient
from net.transport import P2PTransport
from shards.tiny import make_tiny_model
from tests.helpers import LocalSwarm


def _median_s(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "model", "gpt2", num_layers=args.layers, hidden_size=args.hidden,
                                    num_heads=8)
        swarm = LocalSwarm(model_dir, state_dir=Path(tmp) / "state", num_stages=1, num_peers=1)
        swarm.start()
        try:
            _measure(swarm, Path(tmp), args.rounds)
        finally:
            swarm.stop()


def _measure(swarm: LocalSwarm, tmp: Path, rounds: int) -> None:
    peer = swarm.peers[0]
    executor = peer.service.executor
    with swarm.client() as remote:  # one step, so the AdamW state exists and travels too
        ids = torch.randint(0, 256, (8, 32))
        remote(ids, labels=ids).loss.backward()
    capture = peer.service._capture_state
    meta, tensors = capture(True)
    size_mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
    print(f"stage state: {len(tensors)} tensors, {size_mb:.1f} MB (parameters + AdamW state), step {meta.step}")

    copy_s = _median_s(lambda: capture(True), rounds)
    files = CheckpointDir(tmp / "bench-checkpoints")
    write_s = _median_s(lambda: files.save(meta, tensors), rounds)

    # a node of its own, as a joining replica has (see docs/design.md on replicated p2p handles)
    dht = SwarmDHT.create_client(swarm.run_id, swarm.initial_peers)

    async def fetch_rounds() -> list[float]:
        client = StageClient(P2PTransport(await dht.dht.replicate_p2p()), attempts=1)
        times = []
        try:
            for _ in range(rounds):
                started = time.perf_counter()
                await client.fetch_state(peer.peer_id, executor.stage, executor.layers)
                times.append(time.perf_counter() - started)
        finally:
            await client.transport.p2p.shutdown()
        return times

    try:
        fetch_s = statistics.median(swarm.loop.run(fetch_rounds(), timeout=600))
    finally:
        dht.shutdown()
    print(f"median of {rounds}:")
    print(f"  state copy on the compute thread  {copy_s * 1000:8.1f} ms  ({size_mb / copy_s:8.0f} MB/s)")
    print(f"  checkpoint files (safetensors)    {write_s * 1000:8.1f} ms  ({size_mb / write_s:8.0f} MB/s)")
    print(f"  download over loopback P2P        {fetch_s * 1000:8.1f} ms  ({size_mb / fetch_s:8.0f} MB/s)")
    print(f"  download / copy: {fetch_s / copy_s:.1f}x")


if __name__ == "__main__":
    main()
