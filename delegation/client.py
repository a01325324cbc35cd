"""Stubs of the delegation RPCs, as a delegator (or ``swarm status``) calls them.

Every call is retried a bounded number of times with backoff while the delegate is unreachable
(``peers.training.client.retried_call`` logs each attempt). That is safe for each: a repeated ``start`` of a
delegator that already holds a session there returns that session, ``poll`` and ``status`` change
nothing but the session's last-seen time, and a repeated ``stop`` of a stopped session answers
``UnknownSession``, which the caller treats as stopped.
"""

from __future__ import annotations

from delegation.protocol import (
    POLL,
    START,
    STATUS,
    STOP,
    DelegateStatus,
    PollRequest,
    PollResponse,
    StartRequest,
    StartResponse,
    StatusRequest,
    StopRequest,
    StopResponse,
)
from peers.training.client import retried_call
from net.rpc import parse_reply
from net.transport import Transport
from core.types import PeerId, StageIndex

__all__ = ["DelegationClient"]


class DelegationClient:
    """Calls one delegate's ``swarm.delegation.*`` handlers over a ``Transport``."""

    def __init__(self, transport: Transport, delegate: PeerId, *, timeout: float = 30.0, attempts: int = 3,
                 backoff: float = 0.5):
        self.transport, self.delegate = transport, delegate
        self.timeout, self.attempts, self.backoff = timeout, attempts, backoff

    async def start(self, token: str, delegator: PeerId, stage: StageIndex | None = None) -> StartResponse:
        return await self._call(START, StartRequest(token=token, delegator=delegator, stage=stage), StartResponse)

    async def poll(self, session_id: str, ack: int) -> PollResponse:
        return await self._call(POLL, PollRequest(session_id=session_id, ack=ack), PollResponse)

    async def stop(self, session_id: str, ack: int) -> StopResponse:
        return await self._call(STOP, StopRequest(session_id=session_id, ack=ack), StopResponse)

    async def status(self) -> DelegateStatus:
        return await self._call(STATUS, StatusRequest(), DelegateStatus)

    async def _call(self, method: str, request, reply_model):
        reply, _ = await retried_call(self.transport, self.delegate, method, request, [],
                                      timeout=self.timeout, attempts=self.attempts, backoff=self.backoff)
        return parse_reply(reply_model, reply)
