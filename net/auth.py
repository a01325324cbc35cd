"""Keys on the peer side: get an access token from a bootstrap, present it, and refuse callers that
have not.

Protocol (one-stream RPCs over the same transport as the stage RPCs):

- ``swarm.auth.token`` (served by a bootstrap): ``TokenRequest(key, peer_id, public_key)`` ->
  ``TokenReply(token, expires)``. The caller must be the peer id it asks for (libp2p authenticates it).
- ``swarm.auth.present`` (served by every peer of a keyed run): ``PresentRequest(token)``; the peer
  checks the token (authority signature, expiry, revocation, caller == holder) and lets that caller's
  RPCs through until the token expires or its key is revoked.

``AuthedTransport`` wraps a client's transport so that the first call to a peer presents the token
first, and an "unknown caller" refusal (the peer restarted, the token was renewed) re-presents once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from typing import Any, Callable, Literal, Sequence

import torch
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPublicKey
from pydantic import Field

from dht.auth import TokenRecordValidator, verify_token
from dht.schemas import RunControl
from dht.control import find_bootstraps, get_control
from dht.records import SwarmDHT
from core.messages import PROTOCOL_VERSION, FrozenModel
from net.rpc import Outgoing, error_reply, ok_reply, parse_reply, parse_request
from net.transport import CALLER, Handler, P2PTransport, Transport
from core.loop import cancel_and_wait
from core.errors import AuthRejected, PeerUnavailable, SwarmError
from core.types import PeerId

__all__ = [
    "TOKEN",
    "PRESENT",
    "TokenRequest",
    "TokenReply",
    "PresentRequest",
    "PresentReply",
    "AuthGate",
    "AuthedTransport",
    "RunAuth",
    "ClientCalls",
]

logger = logging.getLogger(__name__)

TOKEN = "swarm.auth.token"
PRESENT = "swarm.auth.present"
_NOT_PRESENTED = "present an access token first"


class TokenRequest(FrozenModel):
    """Ask a bootstrap for an access token for ``key``, to be held by ``peer_id`` (the caller).

    ``scope`` ``join`` (a peer or trainer joining) needs a key with scope join and gets a token;
    ``api`` (an API server checking its client's key) needs scope api and gets no token (an empty
    one): an inference key never becomes a token that would let its holder join."""

    version: int = PROTOCOL_VERSION
    key: str = Field(min_length=1, max_length=200)
    peer_id: PeerId = Field(min_length=1, max_length=128)
    public_key: str = Field(min_length=1, max_length=2048, description="base64 of the DHT record key")
    scope: Literal["join", "api"] = "join"


class TokenReply(FrozenModel):
    version: int = PROTOCOL_VERSION
    token: str
    key_id: str
    expires: float


class PresentRequest(FrozenModel):
    version: int = PROTOCOL_VERSION
    token: str = Field(min_length=1, max_length=8192)


class PresentReply(FrozenModel):
    version: int = PROTOCOL_VERSION
    expires: float


class AuthGate:
    """A node's list of callers that presented a valid token (and until when). A ``P2PTransport``
    built with it as its ``gate`` checks every stream's caller against it before reading the
    request (``net.admission``); ``rpc_present`` is served ``public`` beside."""

    def __init__(self, authority: bytes, revoked: frozenset[str] = frozenset()):
        self.update(authority, revoked)
        self._allowed: dict[str, tuple[str, float]] = {}

    def update(self, authority: bytes, revoked: frozenset[str]) -> None:
        self.authority, self.revoked = authority, frozenset(revoked)
        self._authority_key = RSAPublicKey.from_bytes(authority)
        for caller, (key_id, _) in list(getattr(self, "_allowed", {}).items()):
            if key_id in self.revoked:
                logger.warning("key %s was revoked: refusing %s from now on", key_id, caller[-8:])
                del self._allowed[caller]

    async def rpc_present(self, message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        try:
            request = parse_request(PresentRequest, message)
            claims = verify_token(request.token, self._authority_key, revoked=self.revoked)
            caller = CALLER.get()
            if caller is not None and caller != claims.peer_id:
                raise AuthRejected(f"this token belongs to {claims.peer_id[-8:]}, not to the caller {caller[-8:]}")
            self._allowed[claims.peer_id] = (claims.key_id, claims.expires)
            return ok_reply(PresentReply(expires=claims.expires)), []
        except SwarmError as e:
            return error_reply(e), []

    def check(self, caller: PeerId | None) -> None:
        allowed = self._allowed.get(caller or "")
        if allowed is None:
            raise AuthRejected(f"this run needs a key: {_NOT_PRESENTED} ({PRESENT})")
        key_id, expires = allowed
        if key_id in self.revoked:
            raise AuthRejected(f"API key {key_id} has been revoked")
        if expires <= get_dht_time():
            del self._allowed[caller]
            raise AuthRejected(f"the access token has expired: {_NOT_PRESENTED} ({PRESENT})")


class AuthedTransport:
    """A client transport that presents its token to each peer before its first call."""

    def __init__(self, inner: Transport, token: Callable[[], str]):
        self.inner, self.token = inner, token
        self._presented: dict[str, str] = {}

    async def serve(self, method: str, handler: Handler, **options: Any) -> None:
        await self.inner.serve(method, handler, **options)

    async def call(self, peer_id: PeerId, method: str, message: Outgoing, tensors: Sequence[torch.Tensor], *,
                   timeout: float, **options: Any) -> tuple[Any, list[torch.Tensor]]:
        """``options`` (``max_reply_bytes``) go to the inner transport's call."""
        if self._presented.get(peer_id) != self.token():
            await self._present(peer_id, timeout)
        reply, out = await self.inner.call(peer_id, method, message, tensors, timeout=timeout, **options)
        if _not_presented(reply):  # the peer restarted or dropped us: present again, once
            await self._present(peer_id, timeout)
            reply, out = await self.inner.call(peer_id, method, message, tensors, timeout=timeout, **options)
        return reply, out

    async def _present(self, peer_id: PeerId, timeout: float) -> None:
        token = self.token()
        reply, _ = await self.inner.call(peer_id, PRESENT, PresentRequest(token=token), [],
                                         timeout=timeout)
        parse_reply(PresentReply, reply)
        self._presented[peer_id] = token


def _not_presented(reply: Any) -> bool:
    error = reply.get("error") if isinstance(reply, dict) else None
    return isinstance(error, dict) and error.get("code") == "AuthRejected" and _NOT_PRESENTED in str(error.get("message"))


class RunAuth:
    """A node's membership of a keyed run: its token (renewed at half-life), the gate for its own
    handlers, and the run's validator in its DHT process, all following the run-control record."""

    def __init__(self, dht: SwarmDHT, key: str, control: RunControl, authority: bytes,
                 bootstraps: list[str], transport: P2PTransport, *, on_revoked: Callable[[], None] | None = None):
        self.dht, self.key, self.authority = dht, key, authority
        self.bootstraps, self.transport, self.on_revoked = bootstraps, transport, on_revoked
        self.gate = AuthGate(authority, frozenset(control.revoked))
        self.token = ""
        self.key_id = ""
        self.expires = 0.0
        self._task: asyncio.Task | None = None

    @classmethod
    async def join(cls, dht: SwarmDHT, key: str | None, *, wait: float = 10.0,
                   on_revoked: Callable[[], None] | None = None) -> "RunAuth | None":
        """None for an open run; else a token for ``key`` (``AuthRejected`` if it is missing or bad)."""
        control = await _wait_control(dht, wait)
        if control is None or not control.keys_required:
            return None
        if not key:
            raise AuthRejected(f"run {dht.run_id!r} needs an API key: pass --key or set SWARM_KEY "
                               "(the run owner makes one with `swarm keys create`)")
        found = await find_bootstraps(dht)
        if not found:
            raise PeerUnavailable(_no_bootstrap(dht.run_id, "none is announced in the DHT"))
        transport = P2PTransport(await dht.dht.replicate_p2p())
        auth = cls(dht, key, control, found[0][1], _entry_first(dht, [peer for peer, _ in found]), transport,
                   on_revoked=on_revoked)
        try:
            await auth.renew()
        except BaseException:
            await auth.stop()
            raise
        dht.dht.add_validators([TokenRecordValidator(dht.run_id, auth.authority, frozenset(control.revoked))])
        dht.access_token = auth.token_text
        return auth

    def token_text(self) -> str:
        return self.token

    async def renew(self) -> None:
        """A fresh token for this node's key (``exchange``)."""
        got, bootstrap = await self.exchange(self.key)
        self.token, self.key_id, self.expires = got.token, got.key_id, got.expires
        logger.info("access token for key %s from bootstrap %s, valid for %.0f s", got.key_id, bootstrap[-8:],
                    got.expires - get_dht_time())

    async def exchange(self, key: str, scope: str = "join") -> tuple[TokenReply, str]:
        """Trade ``key`` for a token for this node, asking each bootstrap or mirror of the run in turn
        (those announced now in the DHT, signed by the run's authority, then the ones known before);
        returns the token and the bootstrap that gave it. ``AuthRejected`` if the key is revoked,
        expired or unknown everywhere, ``PeerUnavailable`` if none answers. (The API server also uses
        it to check its clients' keys against the run's.)"""
        public_key = base64.b64encode(self.dht._signer.local_public_key[len(b"[owner:"):-1]).decode()
        request = TokenRequest(key=key, peer_id=self.dht.peer_id, public_key=public_key, scope=scope)
        with contextlib.suppress(Exception):  # a DHT hiccup: ask the ones we know
            live = _entry_first(self.dht, [peer for peer, owner in await find_bootstraps(self.dht)
                                           if owner == self.authority])
            self.bootstraps = [*live, *(peer for peer in self.bootstraps if peer not in live)]
        errors: list[str] = []
        unknown: AuthRejected | None = None
        for bootstrap in self.bootstraps:
            try:
                reply, _ = await self.transport.call(bootstrap, TOKEN, request, [], timeout=_TOKEN_TIMEOUT)
                return parse_reply(TokenReply, reply), bootstrap
            except AuthRejected as e:
                if not str(e).startswith("unknown API key"):
                    raise  # revoked, expired, malformed: the same answer everywhere
                unknown = unknown or e  # a key made seconds ago on another bootstrap: ask that one
            except SwarmError as e:  # that bootstrap is down: try the next one
                errors.append(f"{bootstrap[-8:]}: {type(e).__name__}")
        if unknown is not None:
            raise unknown
        raise PeerUnavailable(_no_bootstrap(self.dht.run_id, f"tried {len(errors)}: {', '.join(errors)}"))

    def follow(self, control: RunControl) -> None:
        """Apply a run-control record: new revocations reach the gate and the DHT validator."""
        revoked = frozenset(control.revoked)
        if revoked == self.gate.revoked:
            return
        self.gate.update(self.authority, revoked)
        self.dht.dht.add_validators([TokenRecordValidator(self.dht.run_id, self.authority, revoked)])
        if self.key_id in revoked:
            logger.error("this node's API key %s was revoked by the run owner", self.key_id)
            if self.on_revoked is not None:
                self.on_revoked()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._renew_forever(), name="token-renew")

    async def _renew_forever(self) -> None:
        failures = 0
        while True:
            wait = max((self.expires - get_dht_time()) / 2, 5.0) if failures == 0 else min(5.0 * 2 ** failures, 60.0)
            await asyncio.sleep(wait)
            try:
                await self.renew()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the bootstrap may be down for a while: keep the token we have
                failures += 1
                logger.warning("renewing the access token failed (attempt %d): %s", failures, e)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self.transport.close()


_TOKEN_TIMEOUT = 15.0


class ClientCalls:
    """The transport of a command that calls a run's nodes and serves nothing (``swarm export``,
    ``swarm ledger verify <bootstrap>``, ``swarm status --delegate``). On a keyed run it holds a token
    for ``key`` and presents it to each node before the first call (every handler but the two
    ``public`` ones refuses a caller that has not); on an open run it is a plain ``P2PTransport``.
    Without a key on a keyed run, ``open`` fails with ``RunAuth.join``'s ``AuthRejected`` naming
    ``--key`` / ``SWARM_KEY``, before any call."""

    def __init__(self, transport: P2PTransport, auth: RunAuth | None):
        self.transport, self.auth = transport, auth
        self.calls: Transport = transport if auth is None else AuthedTransport(transport, auth.token_text)

    @classmethod
    async def open(cls, dht: SwarmDHT, key: str | None) -> "ClientCalls":
        auth = await RunAuth.join(dht, key)
        if auth is not None:
            auth.start()  # an export of a large model may outlive a token
        try:
            return cls(P2PTransport(await dht.dht.replicate_p2p(), addresses=dht.relayed), auth)
        except BaseException:
            if auth is not None:
                await auth.stop()
            raise

    async def close(self) -> None:
        await self.transport.close()
        if self.auth is not None:
            await self.auth.stop()


def _no_bootstrap(run_id: str, detail: str) -> str:
    """The honest limit of a keyed run: only a holder of the authority key can check a key."""
    return (f"no bootstrap or mirror of run {run_id!r} is reachable to check this API key ({detail}). Only a "
            "bootstrap holding the run's authority key can issue access tokens: the peers already in the run "
            "keep training, but a new one can join only once the run owner's bootstrap (or a `swarm bootstrap "
            "--mirror`) is back")


def _entry_first(dht: SwarmDHT, bootstraps: list[str]) -> list[str]:
    """The bootstraps this node was pointed at (``--bootstrap``) first, then the others."""
    entry = {str(addr).rsplit("/p2p/", 1)[-1] for addr in (getattr(dht.dht, "initial_peers", None) or [])}
    return sorted(bootstraps, key=lambda peer: peer not in entry)


async def _wait_control(dht: SwarmDHT, wait: float) -> RunControl | None:
    """The run-control record; a bootstrap publishes it right after the manifest, so allow a moment."""
    deadline = time.monotonic() + wait
    delay = 0.1
    while True:
        control = await get_control(dht)
        if control is not None or time.monotonic() > deadline:
            return control
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
