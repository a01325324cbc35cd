"""Stubs for the inference RPCs, with bounded retries where a retry is safe.

Every call is safe to repeat: opening the same session again replaces it, a repeated step is answered
with the reply of the step the peer already applied, and closing twice is harmless.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import torch

from peers.inference.protocol import (
    CLOSE,
    OPEN,
    STEP,
    CloseRequest,
    CloseResponse,
    OpenRequest,
    OpenResponse,
    StepRequest,
    StepResponse,
)
from net.rpc import Message, parse_reply
from net.transport import Transport
from core.types import LayerRange, PeerId, StageIndex
from core.errors import PeerUnavailable, ProtocolMismatch

__all__ = ["InferenceClient"]

logger = logging.getLogger(__name__)


class InferenceClient:
    """Calls ``open`` / ``step`` / ``close`` of inference sessions on peers over a ``Transport``."""

    def __init__(self, transport: Transport, *, timeout: float = 120.0, attempts: int = 2, backoff: float = 0.25,
                 on_step: Callable[[PeerId, float, StepResponse], None] | None = None):
        """``on_step(peer, seconds, reply)``: told of every step answered, with its round trip in seconds
        (``reply.compute_ms`` is the peer's share of it); a benchmark's per-step breakdown."""
        self.transport = transport
        self.timeout, self.attempts, self.backoff = timeout, attempts, backoff
        self.on_step = on_step

    async def open(
        self, peer_id: PeerId, stage: StageIndex, layers: LayerRange, session_id: str, *, batch_size: int, max_length: int
    ) -> OpenResponse:
        request = OpenRequest(stage=stage, layers=layers, session_id=session_id, batch_size=batch_size,
                              max_length=max_length)
        reply, _ = await self._call(peer_id, OPEN, request, [])
        return parse_reply(OpenResponse, reply)

    async def step(
        self,
        peer_id: PeerId,
        session_id: str,
        start: int,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        request = StepRequest(session_id=session_id, start=start, has_attention_mask=attention_mask is not None)
        tensors = [t for t in (hidden, attention_mask, position_ids) if t is not None]
        started = time.perf_counter()
        reply, out = await self._call(peer_id, STEP, request, tensors)
        response = parse_reply(StepResponse, reply)
        if len(out) != 1:
            raise ProtocolMismatch(f"step reply carried {len(out)} tensors instead of 1")
        if self.on_step is not None:
            self.on_step(peer_id, time.perf_counter() - started, response)
        return out[0]

    async def close(self, peer_id: PeerId, session_id: str) -> CloseResponse:
        # one short try: a peer that is gone drops the session anyway when it idles out
        reply, _ = await self._call(peer_id, CLOSE, CloseRequest(session_id=session_id), [], attempts=1,
                                    timeout=min(self.timeout, 5.0))
        return parse_reply(CloseResponse, reply)

    async def _call(self, peer_id: PeerId, method: str, request: Message, tensors: list[torch.Tensor], *,
                    attempts: int | None = None, timeout: float | None = None):
        attempts = attempts or self.attempts
        for attempt in range(1, attempts + 1):
            try:
                return await self.transport.call(peer_id, method, request, tensors, timeout=timeout or self.timeout)
            except PeerUnavailable as e:
                if attempt == attempts:
                    raise
                logger.warning("%s to %s, attempt %d/%d failed: %s", method, peer_id[-8:], attempt, attempts, e)
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
        raise AssertionError("unreachable: the last attempt returns or raises")
