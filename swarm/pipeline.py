"""The trainer's side of the data plane: send a batch through the route, forward and backward.

Hops are client-mediated: the trainer calls stage 0, then stage 1 with stage 0's output, and so on,
and in reverse for gradients. A ``Trace`` remembers, per stage, the peer and the inputs of each
forward so the backward can go to the same peer (which still holds the graph) or, after a
``CacheMiss``, resend the inputs.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping, Sequence

import torch

from dht.schemas import Manifest, PeerRecord
from peers.client import StageClient, StageInputs
from peers.routing import Hop, Route, plan_routes
from swarm.errors import NoRoute

__all__ = ["RemotePipeline", "Trace", "RecordSource"]

logger = logging.getLogger(__name__)

RecordSource = Callable[[], Awaitable[Mapping[int, Sequence[PeerRecord]]]]
"""Returns the current peer records per stage (the DHT in real use, a dict in unit tests)."""


@dataclass
class _HopTrace:
    hop: Hop
    request_id: str
    inputs: StageInputs
    seed: int


@dataclass
class Trace:
    """What a training forward left behind for its backward."""

    hops: list[_HopTrace] = field(default_factory=list)
    num_samples: int = 0


class RemotePipeline:
    """Runs microbatches through the stages of a run, with routes refreshed from ``records``."""

    def __init__(
        self,
        manifest: Manifest,
        client: StageClient,
        records: RecordSource,
        *,
        route_ttl: float = 10.0,
        route_wait: float = 120.0,
        seed: int | None = None,
        spread: int = 4,
    ):
        self.manifest = manifest
        self.client = client
        self._records = records
        self._route: Route | None = None
        self._route_time = 0.0
        self._route_ttl, self._route_wait = route_ttl, route_wait
        self._rng = random.Random(seed)
        # routing by expected time: routes for ``spread`` microbatches are planned together and handed
        # out in turn; the round trip beyond compute is observed per peer (ms, moving average)
        self._spread = spread
        self._routes: list[Route] = []
        self._turn = 0
        self._throughput: dict[str, float] = {}
        self._overhead_ms: dict[str, float] = {}

    async def route(self, tokens: int = 1) -> Route:
        """The route of the next microbatch (of ``tokens`` tokens): every ``route_ttl`` s the records
        are read again and routes for ``spread`` microbatches planned by expected time (throughput,
        queued microbatches, observed latency); waits (bounded) for missing stages."""
        if self._routes and time.monotonic() - self._route_time < self._route_ttl:
            return self._next_route()
        deadline = time.monotonic() + self._route_wait
        attempt = 0
        while True:
            attempt += 1
            try:
                records = await self._records()
                self._routes = plan_routes(self.manifest.stages, records, self._spread, rng=self._rng,
                                           tokens=tokens, latency_ms=dict(self._overhead_ms))
                self._throughput = {r.peer_id: r.throughput for found in records.values() for r in found}
                self._route_time, self._turn = time.monotonic(), 0
                return self._next_route()
            except NoRoute as e:
                if time.monotonic() > deadline:
                    raise NoRoute(f"{e} (waited {self._route_wait:.0f} s)") from None
                if attempt == 1 or attempt % 10 == 0:
                    logger.warning("waiting for peers: %s (attempt %d)", e, attempt)
                await asyncio.sleep(min(0.25 * attempt, 2.0))

    async def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None, *, train: bool
    ) -> tuple[torch.Tensor, Trace]:
        trace = Trace(num_samples=hidden.shape[0])
        tokens = hidden.shape[0] * hidden.shape[1]
        for hop in await self.route(tokens):
            request_id = uuid.uuid4().hex
            seed = self._rng.randrange(2**31)
            inputs = (hidden, mask, positions)
            started = time.perf_counter()
            hidden = await self.client.forward(
                hop.peer_id, hop.stage, hop.layers, request_id, inputs, train=train, seed=seed
            )
            self._observe(hop.peer_id, time.perf_counter() - started, tokens)
            if train:
                trace.hops.append(_HopTrace(hop, request_id, inputs, seed))
        return hidden, trace

    def _next_route(self) -> Route:
        self._route = self._routes[self._turn % len(self._routes)]
        self._turn += 1
        return self._route

    def _observe(self, peer_id: str, seconds: float, tokens: int) -> None:
        """Remember how much longer than its compute a call to ``peer_id`` took (network, queues)."""
        throughput = self._throughput.get(peer_id, 0.0)
        compute = tokens / throughput if throughput > 0 else 0.0
        overhead_ms = max(seconds - compute, 0.0) * 1000
        previous = self._overhead_ms.get(peer_id)
        self._overhead_ms[peer_id] = overhead_ms if previous is None else 0.7 * previous + 0.3 * overhead_ms

    async def backward(self, trace: Trace, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output
        for step in reversed(trace.hops):
            hop = step.hop
            grad, _ = await self.client.backward(
                hop.peer_id, hop.stage, hop.layers, step.request_id, grad, step.inputs,
                num_samples=trace.num_samples, seed=step.seed,
            )
        return grad
