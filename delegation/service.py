"""Thin handlers of the delegation RPCs: parse, call ``DelegateSessions``, reply.

Registered by a delegate (``swarm join --accept-delegations``) beside its stage RPCs, behind the run's
auth gate on keyed runs; each handler answers a ``SwarmError`` as its error reply and never lets a bad
request cost more than that request (``net.rpc.guarded``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from delegation.protocol import (
    POLL,
    START,
    STATUS,
    STOP,
    PollRequest,
    StartRequest,
    StatusRequest,
    StopRequest,
    parse_delegation_request,
)
from delegation.sessions import DelegateSessions, TokenSet
from net.rpc import guarded, ok_reply
from net.transport import CALLER, Handler
from core.config import DelegationSettings

__all__ = ["DelegationService", "serve_delegations"]

logger = logging.getLogger(__name__)


class DelegationService:
    """The ``swarm.delegation.*`` handlers of one delegate. The caller's peer id comes from libp2p
    (``CALLER``), so a delegator cannot act for another."""

    def __init__(self, sessions: DelegateSessions):
        self.sessions = sessions

    def handlers(self) -> dict[str, Handler]:
        return {START: guarded(self.rpc_start, logger), POLL: guarded(self.rpc_poll, logger),
                STOP: guarded(self.rpc_stop, logger), STATUS: guarded(self.rpc_status, logger)}

    async def register(self, serve: Callable) -> None:
        """``serve(method, handler)`` for each RPC (``DelegateHost.serve_control`` or a transport's ``serve``)."""
        for method, handler in self.handlers().items():
            await serve(method, handler)

    async def rpc_start(self, message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list]:
        request = parse_delegation_request(StartRequest, message)
        return ok_reply(await self.sessions.open(request, CALLER.get())), []

    async def rpc_poll(self, message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list]:
        request = parse_delegation_request(PollRequest, message)
        return ok_reply(self.sessions.poll(request, CALLER.get())), []

    async def rpc_stop(self, message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list]:
        request = parse_delegation_request(StopRequest, message)
        return ok_reply(await self.sessions.close(request, CALLER.get())), []

    async def rpc_status(self, message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list]:
        parse_delegation_request(StatusRequest, message)
        return ok_reply(self.sessions.status()), []


async def serve_delegations(host, settings: DelegationSettings) -> DelegateSessions:
    """Make ``host`` (a started ``Peer``'s ``delegate``, ``peers.delegate_host.DelegateHost``) a delegate: register the delegation RPCs on it
    and start expiring sessions. The caller stops the returned sessions before the peer."""
    tokens = TokenSet(settings.tokens, settings.tokens_file)
    if not tokens:
        logger.warning("accepting delegations without any delegation token configured: no session can start "
                       "(set delegation.tokens or delegation.tokens_file)")
    sessions = DelegateSessions(host, tokens, max_sessions=settings.max_sessions, ttl=settings.session_ttl)
    await DelegationService(sessions).register(host.serve_control)
    sessions.start()
    logger.info("accepting delegations: up to %d sessions, idle sessions end after %.0f s", settings.max_sessions,
                settings.session_ttl)
    return sessions
