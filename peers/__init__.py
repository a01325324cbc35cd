"""A serving peer: stage RPC protocol, transport, compute, client stubs, routing and lifecycle."""

from peers.client import StageClient
from peers.executor import StageExecutor
from peers.routing import Hop, Route, coverage, expected_time, plan_route, plan_routes, record_loads
from peers.server import Peer
from peers.service import StageService
from peers.transport import InMemoryTransport, P2PTransport, Transport

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
