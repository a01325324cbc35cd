"""``StageRouter``: a serving peer's stage and inference RPCs, registered once, each request handed to
the slot of the stage it names.

A request is parsed once, here, into its message (``peers.training.protocol``, ``peers.inference.protocol``),
and routed by the parsed model's ``stage`` (an inference step or close: by the slot holding its
session); the slot's service gets the model. A message that does not parse names no stage: the first
slot's handler answers it with the error (and counts it, as it counts ``info`` without a stage).
A push computes its hop through ``local``, the same routing with the model the push already holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any, Callable, Collection

import torch

from peers.telemetry.activity import ObservedTransport
from peers.hosting import StageHost
from peers.inference.protocol import INFERENCE_REQUESTS, OpenRequest
from peers.inference.service import InferenceService
from peers.training.protocol import BACKWARD, FORWARD, STAGE_REQUESTS, BackwardRequest, ForwardRequest
from net.rpc import parse_request
from peers.training.push import LocalCall
from peers.training.service import StageService
from net.transport import Handler
from core.errors import PeerUnavailable, SwarmError, WrongStage

__all__ = ["StageRouter"]

logger = logging.getLogger(__name__)

Service = StageService | InferenceService


class StageRouter:
    """Routes requests to ``host``'s slots (a move swaps them under the registered handlers), counts
    requests in flight per stage (a move drains the stages it leaves) and adds the configured
    artificial ``slowdown`` to forwards and backwards."""

    def __init__(self, host: StageHost, *, slowdown: float = 0.0):
        self.host = host
        self.slowdown = slowdown
        self._in_flight: Counter[int | None] = Counter()
        self._last_request: dict[int | None, float] = {}

    async def register(self, transport: ObservedTransport) -> None:
        """Serve every stage and inference RPC on ``transport`` (once: the same methods for every stage)."""
        for method, model in STAGE_REQUESTS.items():
            await transport.serve(method, self._handler(method, model, self._service_for))
        for method, model in INFERENCE_REQUESTS.items():
            await transport.serve(method, self._handler(method, model, self._inference_for))

    def local(self, transport: ObservedTransport) -> LocalCall:
        """A push's hop, computed here like a forward or backward from a trainer (counted on ``transport``)."""
        hop = {method: transport.wrap(method, self._parsed(method)) for method in (FORWARD, BACKWARD)}
        return lambda method, request, tensors: hop[method](request, tensors)

    def in_flight(self, stages: Collection[int]) -> int:
        return sum(self._in_flight[stage] for stage in stages)

    def idle_seconds(self, stages: Collection[int]) -> float:
        """Seconds since the last request to any of ``stages`` started or ended."""
        return min(time.monotonic() - self._last_request.get(stage, 0.0) for stage in stages)

    def _handler(self, method: str, model: type, service_for: Callable[[Any], Service]) -> Handler:
        async def handler(message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
            try:
                request = parse_request(model, message)
            except SwarmError:  # no stage to route by: the first slot's handler names what is wrong
                return await service_for(None).handlers()[method](message, tensors)
            return await self._serve(method, service_for(request), request, tensors)

        return handler

    def _parsed(self, method: str) -> Handler:
        async def handler(request: ForwardRequest | BackwardRequest,
                          tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
            return await self._serve(method, self._service_for(request), request, tensors)

        return handler

    async def _serve(self, method: str, service: Service, request: Any,
                     tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        stage = service.executor.stage if isinstance(service, StageService) else None
        slowdown = self.slowdown if method in (FORWARD, BACKWARD) else 0.0
        self._in_flight[stage] += 1
        self._last_request[stage] = time.monotonic()
        try:
            if slowdown:
                await asyncio.sleep(slowdown)
            reply, out = await service.parsed_handlers()[method](request, tensors)
        finally:
            self._in_flight[stage] -= 1
            self._last_request[stage] = time.monotonic()
        await self._report_hosted_work(service, method, request, tensors, reply, out)
        return reply, out

    def _service_for(self, request: Any | None) -> StageService:
        """The service of the stage a request names. A request without a stage (``info``), or a
        message that did not parse (None), goes to the first stage's service."""
        host, stage = self.host, getattr(request, "stage", None)
        hosted = host.hosted.get(stage) if stage is not None else None
        if hosted is not None and hosted.service is not None:
            return hosted.service
        first = next(iter(host.slots.values()), None)
        slot = host.slots.get(stage) if stage is not None else first
        if slot is not None and slot.service is not None:
            return slot.service
        if host.moving or first is None or first.service is None or slot is not None:
            raise PeerUnavailable(f"peer {host.peer_id[-8:]} is loading {host.span or 'its stages'}")
        first.service.errors_replied += 1  # the peer's refusals count with its first stage's (``info``)
        logger.info("refused a request for stage %s: this peer serves %s", stage, host.span)
        raise WrongStage(f"peer {host.peer_id[-8:]} serves {host.span}, not stage {stage}")

    def _inference_for(self, request: Any | None) -> InferenceService:
        """The generation service of the stage an ``open`` names, or of the stage holding the session a
        ``step`` / ``close`` names; a message that did not parse (None) or an unknown session goes to
        the first stage's, which names the error (an unknown session: ``CacheMiss``)."""
        host = self.host
        slots = [s for s in host.slots.values() if s.inference is not None]
        if not slots or host.moving:
            raise PeerUnavailable(f"peer {host.peer_id[-8:]} is loading {host.span or 'its stages'}")
        if isinstance(request, OpenRequest):
            slot = host.slots.get(request.stage)
            if slot is None or slot.inference is None:
                raise WrongStage(f"peer {host.peer_id[-8:]} serves {host.span}, not stage {request.stage}")
            return slot.inference
        if request is None:
            return slots[0].inference
        return next((s.inference for s in slots if request.session_id in s.inference.sessions), slots[0].inference)

    async def _report_hosted_work(self, service: Service, method: str, request: Any, tensors: list[torch.Tensor],
                                  reply: dict, out: list[torch.Tensor]) -> None:
        """A hosted stage's answered forward/backward goes to its session's hook (its receipts)."""
        if method not in (FORWARD, BACKWARD) or not isinstance(reply, dict) or "ok" not in reply:
            return
        slot = next((s for s in self.host.hosted.values() if s.service is service), None)
        if slot is not None and slot.on_work is not None:
            try:
                await slot.on_work(method, request, tensors, reply, out)
            except Exception:  # a receipt lost costs the delegator credit, never the trainer its reply
                logger.exception("recording work on hosted stage %d failed", slot.stage)
