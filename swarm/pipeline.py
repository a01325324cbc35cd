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
from peers.routing import Hop, Route, plan_route
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
    ):
        self.manifest = manifest
        self.client = client
        self._records = records
        self._route: Route | None = None
        self._route_time = 0.0
        self._route_ttl, self._route_wait = route_ttl, route_wait
        self._rng = random.Random(seed)

    async def route(self) -> Route:
        """The current route, refreshed every ``route_ttl`` s; waits (bounded) for missing stages."""
        if self._route is not None and time.monotonic() - self._route_time < self._route_ttl:
            return self._route
        deadline = time.monotonic() + self._route_wait
        attempt = 0
        while True:
            attempt += 1
            try:
                self._route = plan_route(self.manifest.stages, await self._records(), rng=self._rng)
                self._route_time = time.monotonic()
                return self._route
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
        for hop in await self.route():
            request_id = uuid.uuid4().hex
            seed = self._rng.randrange(2**31)
            inputs = (hidden, mask, positions)
            hidden = await self.client.forward(
                hop.peer_id, hop.stage, hop.layers, request_id, inputs, train=train, seed=seed
            )
            if train:
                trace.hops.append(_HopTrace(hop, request_id, inputs, seed))
        return hidden, trace

    async def backward(self, trace: Trace, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output
        for step in reversed(trace.hops):
            hop = step.hop
            grad, _ = await self.client.backward(
                hop.peer_id, hop.stage, hop.layers, step.request_id, grad, step.inputs,
                num_samples=trace.num_samples, seed=step.seed,
            )
        return grad
