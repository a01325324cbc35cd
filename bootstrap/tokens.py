"""``TokenService``: the bootstrap's ``swarm.auth.token`` handler, exchanging an API key for a
signed access token (see ``net.auth`` for the protocol and ``dht.auth`` for the token), and checking
an API server's client keys (scope ``api``: no token, see ``TokenRequest``)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import time
from typing import Any

import torch
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from bootstrap.state import StateDB
from dht.auth import issue_token
from net.auth import TokenReply, TokenRequest
from net.rpc import error_reply, ok_reply, parse_request
from net.transport import CALLER
from core.errors import AuthRejected, BadRequest, SwarmError
from core.types import PeerId

__all__ = ["TokenService"]

logger = logging.getLogger(__name__)

_AUDIT_EVERY = 60.0


class TokenService:
    """Checks the key in ``state.db`` (so a revoked or expired key, or one without the scope asked
    for, gets nothing) and signs a token for the caller. The first token of each (key, peer), every
    API key check and every refusal are audited, the same refusal (caller and reason) at most once a
    minute so that a misconfigured peer retrying cannot flood the log."""

    def __init__(self, db: StateDB, authority: RSAPrivateKey, ttl: float):
        self.db, self.authority, self.ttl = db, authority, ttl
        self._granted: set[tuple[str, str]] = set()
        self._last_refusal: dict[tuple[str, str], float] = {}

    async def rpc_token(self, message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        caller = CALLER.get()
        try:
            request = parse_request(TokenRequest, message)
            if caller is not None and caller != request.peer_id:
                raise AuthRejected(f"a token is only issued to its holder: the caller is {caller[-8:]}")
            try:
                public_key = base64.b64decode(request.public_key, validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest("TokenRequest: public_key: not base64") from None
            key = await asyncio.to_thread(self.db.verify_key, request.key, scope=request.scope)
            expires = min(get_dht_time() + self.ttl, key.expires if key.expires is not None else math.inf)
            token = issue_token(self.authority, key.id, request.peer_id, public_key, expires) \
                if request.scope == "join" else ""
        except SwarmError as e:
            await self._audit_refusal(caller or "?", e)
            return error_reply(e), []
        if request.scope == "api":
            await asyncio.to_thread(self.db.audit, request.peer_id, "api.check", f"key {key.id} ({key.name})")
            return ok_reply(TokenReply(token=token, key_id=key.id, expires=expires)), []
        if (key.id, request.peer_id) not in self._granted:
            self._granted.add((key.id, request.peer_id))
            await asyncio.to_thread(self.db.audit, request.peer_id, "peer.auth", f"key {key.id} ({key.name})")
        return ok_reply(TokenReply(token=token, key_id=key.id, expires=expires)), []

    async def _audit_refusal(self, caller: PeerId, error: SwarmError) -> None:
        logger.info("refused a token to %s: %s", caller[-8:], error)
        now = time.monotonic()
        if now - self._last_refusal.get((caller, str(error)), -math.inf) >= _AUDIT_EVERY:
            self._last_refusal[(caller, str(error))] = now
            await asyncio.to_thread(self.db.audit, caller, "auth.rejected", str(error))
