"""A serving peer, grouped by role: ``training`` (stage RPCs, compute, push, averaging, client stubs,
routing), ``inference`` (KV-cache sessions), ``state`` (snapshots, checkpoints, recovery, resync),
``accounting`` (the contribution ledger), ``telemetry`` (monitoring, metrics, run control, status data),
``joining`` (measurements, placement claims, reachability) and ``data`` (the data-lease messages and
the trainer's stub); ``peers.server.Peer`` ties them into one lifecycle.

May import: core, shards, dht, net. Imported by: trainer, delegation, bootstrap, swarm.
"""

from peers.training.client import StageClient
from peers.training.executor import StageExecutor
from peers.training.routing import Hop, Route, coverage, expected_time, plan_route, plan_routes, record_loads
from peers.server import Peer
from peers.training.service import StageService
from net.transport import InMemoryTransport, P2PTransport, Transport

__all__ = [
    "Hop",
    "InMemoryTransport",
    "P2PTransport",
    "Peer",
    "Route",
    "StageClient",
    "StageExecutor",
    "StageService",
    "Transport",
    "coverage",
    "plan_route",
    "expected_time",
    "plan_routes",
    "record_loads",
]
