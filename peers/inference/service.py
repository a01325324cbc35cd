"""Thin handlers of the inference RPCs: parse, run on the peer's compute thread, reply.

Like ``StageService``, a failure of one request becomes an error reply and the peer goes on serving.
A sweeper drops idle sessions every few seconds, also on the compute thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import Executor
from typing import Any, Callable

import torch

from peers.inference.sessions import InferenceSessions
from peers.inference.protocol import (
    CLOSE,
    INFERENCE_REQUESTS,
    OPEN,
    STEP,
    CloseRequest,
    CloseResponse,
    OpenRequest,
    StepRequest,
)
from net.rpc import guarded, ok_reply, parsing
from peers.training.worker import on_thread
from net.transport import Handler, Transport
from core.errors import BadRequest

__all__ = ["InferenceService"]

logger = logging.getLogger(__name__)


class InferenceService:
    """Serves ``swarm.inference.open|step|close`` for one stage's ``InferenceSessions``."""

    def __init__(self, sessions: InferenceSessions, worker: Executor, *, sweep_every: float = 5.0):
        """``worker`` is the peer's one compute thread: every torch call and every touch of the
        session table happens there."""
        self.sessions = sessions
        self._worker = worker
        self._sweep_every = sweep_every
        self._sweeper: asyncio.Task | None = None

    @property
    def steps_served(self) -> int:
        """Steps computed for clients (a reply replayed to a client that repeated its step is not one)."""
        return self.sessions.steps_computed

    async def register(self, transport: Transport) -> None:
        """Serve the handlers on ``transport`` directly and start sweeping (a peer that swaps stages
        registers dispatchers once instead and calls ``start``)."""
        for method, handler in self.handlers().items():
            await transport.serve(method, handler)
        self.start()

    def start(self) -> None:
        """Start dropping idle sessions (every ``sweep_every`` s). Idempotent; needs a running loop."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="inference-session-sweeper")

    def handlers(self) -> dict[str, Handler]:
        """Each RPC as a transport handler: it parses its message, then serves it."""
        return {method: guarded(parsing(INFERENCE_REQUESTS[method], rpc), logger) for method, rpc in self._rpcs().items()}

    def parsed_handlers(self) -> dict[str, Handler]:
        """Each RPC taking its request parsed already (a peer's router parsed it to pick the stage)."""
        return {method: guarded(rpc, logger) for method, rpc in self._rpcs().items()}

    def _rpcs(self) -> dict[str, Callable]:
        return {OPEN: self.rpc_open, STEP: self.rpc_step, CLOSE: self.rpc_close}

    async def rpc_open(self, request: OpenRequest, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        if tensors:
            raise BadRequest(f"open takes no tensors, got {len(tensors)}")
        return ok_reply(await self._in_worker(self.sessions.open, request)), []

    async def rpc_step(self, request: StepRequest, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        reply, out = await self._in_worker(self.sessions.step, request, tensors)
        return ok_reply(reply), [out]

    async def rpc_close(self, request: CloseRequest, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        closed = await self._in_worker(self.sessions.close, request.session_id)
        return ok_reply(CloseResponse(session_id=request.session_id, closed=closed)), []

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_every)
            try:
                await self._in_worker(self.sessions.expire)
            except RuntimeError:  # the compute thread is shutting down with the peer
                return

    async def _in_worker(self, fn: Callable, *args) -> Any:
        return await on_thread(self._worker, fn, *args)
