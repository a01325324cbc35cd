"""A run's several bootstraps (a primary and its ``--mirror`` s) over P2P.

- ``SyncService`` serves ``swarm.bootstrap.sync``, ``sync_with`` calls it (rules and signatures in
  ``bootstrap.sync``). One call is one exchange: the caller sends its snapshot, the receiver folds
  it into its ``state.db`` and replies with its own snapshot (taken after the fold), which the
  caller folds in; so either side's loop alone brings both databases to the same keys and run state.
- ``BootstrapPeering``: one bootstrap's loop over the others, and its ``{run}_bootstraps`` record.
- ``load_authority`` / ``check_signer``: how a mirror gets the run's authority key and checks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from bootstrap.state import StateDB
from bootstrap.sync import SYNC, NonceWindow, RunStateRow, SyncMessage, sign_sync, verify_sync
from dht.control import BOOTSTRAPS_TTL, get_bootstraps, publish_bootstrap
from dht.schemas import BootstrapRecord
from dht.records import SwarmDHT
from net.rpc import error_reply, ok_reply, parse_reply, parse_request
from net.transport import CALLER, Transport
from core.errors import AuthRejected, ConfigError, PeerUnavailable, SwarmError
from core.types import PeerId

__all__ = ["BootstrapPeering", "SyncService", "SyncResult", "sync_with", "load_authority", "check_signer"]

logger = logging.getLogger(__name__)

_AUDIT_EVERY = 60.0
SYNC_TIMEOUT = 20.0


@dataclass(frozen=True)
class SyncResult:
    peer_id: PeerId
    sent: int
    received: int
    changes: list[str]


def _snapshot(db: StateDB, authority: RSAPrivateKey, *, run_id: str, sender: str, target: PeerId,
              in_reply_to: str = "") -> SyncMessage:
    state, at = db.run_state_row()
    banned, banned_at = db.banned_row()
    return sign_sync(authority, run_id=run_id, sender=sender, target=target, at=get_dht_time(),
                     keys=db.key_rows(), run_state=RunStateRow(state=state, at=at), banned=banned,
                     banned_at=banned_at, in_reply_to=in_reply_to)


class SyncService:
    """``rpc_sync``: refuse anyone who cannot sign with the authority key (audited at most once a
    minute per caller), fold a good snapshot in, answer with ours."""

    def __init__(self, db: StateDB, authority: RSAPrivateKey, *, run_id: str, peer_id: PeerId):
        self.db, self.authority, self.run_id, self.peer_id = db, authority, run_id, peer_id
        self._public = authority.get_public_key()
        self._nonces = NonceWindow()
        self._last_refusal: dict[str, float] = {}

    async def rpc_sync(self, message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        caller = CALLER.get()
        try:
            request = parse_request(SyncMessage, message)
            verify_sync(request, self._public, run_id=self.run_id, sender=caller, target=self.peer_id,
                        now=get_dht_time(), nonces=self._nonces)
        except SwarmError as e:
            await self._audit_refusal(caller or "?", e)
            return error_reply(e), []
        changes = await asyncio.to_thread(self.db.merge_sync, request.keys, request.run_state,
                                          source=f"sync:{request.sender}", banned=request.banned,
                                          banned_at=request.banned_at)
        if changes:
            logger.info("sync from bootstrap %s: %s", request.sender[-8:], ", ".join(changes))
        reply = await asyncio.to_thread(_snapshot, self.db, self.authority, run_id=self.run_id, sender=self.peer_id,
                                        target=request.sender, in_reply_to=request.nonce)
        return ok_reply(reply), []

    async def _audit_refusal(self, caller: PeerId, error: SwarmError) -> None:
        logger.warning("refused a sync from %s: %s", caller[-8:], error)
        now = time.monotonic()
        if now - self._last_refusal.get(caller, -math.inf) >= _AUDIT_EVERY:
            self._last_refusal[caller] = now
            await asyncio.to_thread(self.db.audit, caller, "sync.rejected", str(error))


async def sync_with(transport: Transport, db: StateDB, authority: RSAPrivateKey, *, run_id: str, own_peer_id: str,
                    peer_id: PeerId, timeout: float = SYNC_TIMEOUT) -> SyncResult:
    """One exchange with the bootstrap ``peer_id``. ``AuthRejected`` if either side's message does
    not prove the authority key (the other side is not a bootstrap of this run); ``PeerUnavailable``
    / ``StageTimeout`` if it does not answer."""
    request = await asyncio.to_thread(_snapshot, db, authority, run_id=run_id, sender=own_peer_id, target=peer_id)
    reply, _ = await transport.call(peer_id, SYNC, request, [], timeout=timeout)
    answer = parse_reply(SyncMessage, reply)
    try:
        verify_sync(answer, authority.get_public_key(), run_id=run_id, sender=peer_id, target=own_peer_id,
                    now=get_dht_time(), in_reply_to=request.nonce)
    except AuthRejected as e:
        raise AuthRejected(f"bootstrap {peer_id[-8:]} answered a sync without proving the run's authority key: {e}") from None
    changes = await asyncio.to_thread(db.merge_sync, answer.keys, answer.run_state, source=f"sync:{peer_id}",
                                      banned=answer.banned, banned_at=answer.banned_at)
    if changes:
        logger.info("sync from bootstrap %s: %s", peer_id[-8:], ", ".join(changes))
    return SyncResult(peer_id, len(request.keys), len(answer.keys), changes)


class BootstrapPeering:
    """One bootstrap's part among the run's bootstraps: serve the sync, sync with every other one
    (the ``--mirror`` target and those in ``{run}_bootstraps``) every ``interval`` seconds, and keep
    this bootstrap's own ``{run}_bootstraps`` record fresh (withdrawn at shutdown)."""

    def __init__(self, dht: SwarmDHT, db: StateDB, authority: RSAPrivateKey, transport: Transport, *,
                 mirror: str | None, interval: float):
        self.dht, self.db, self.authority, self.transport = dht, db, authority, transport
        self.mirror, self.interval = mirror, interval
        self._failures: dict[str, int] = {}
        self._synced: set[str] = set()
        self._expiration = 0.0

    async def serve(self) -> None:
        service = SyncService(self.db, self.authority, run_id=self.dht.run_id, peer_id=self.dht.peer_id)
        await self.transport.serve(SYNC, service.rpc_sync)

    async def targets(self) -> list[str]:
        found = [self.mirror.rsplit("/p2p/", 1)[-1]] if self.mirror else []
        found += [record.peer_id for record, _ in await get_bootstraps(self.dht)]
        return [t for t in dict.fromkeys(found) if t != self.dht.peer_id]

    async def sync_once(self) -> list[SyncResult]:
        """Exchange state with every other live bootstrap of the run, at once; failures are logged
        (the first one per bootstrap as a warning) and retried next round."""
        results = await asyncio.gather(*(self._sync_one(t) for t in await self.targets()))
        return [r for r in results if r is not None]

    async def _sync_one(self, peer_id: PeerId) -> SyncResult | None:
        try:
            result = await sync_with(self.transport, self.db, self.authority, run_id=self.dht.run_id,
                                     own_peer_id=self.dht.peer_id, peer_id=peer_id,
                                     timeout=min(SYNC_TIMEOUT, max(5.0, self.interval * 2)))
        except SwarmError as e:
            failures = self._failures[peer_id] = self._failures.get(peer_id, 0) + 1
            log = logger.warning if failures == 1 or isinstance(e, AuthRejected) else logger.debug
            log("syncing with bootstrap %s failed (attempt %d): %s", peer_id[-8:], failures, e)
            return None
        if self._failures.pop(peer_id, 0) or peer_id not in self._synced:
            self._synced.add(peer_id)
            logger.info("in sync with bootstrap %s (%d keys here, %d there)", peer_id[-8:], result.sent, result.received)
        return result

    async def catch_up(self, required: bool, attempts: int = 3) -> None:
        """Sync before serving tokens, so a restarted bootstrap does not honour a key revoked
        elsewhere while it was down. A new mirror must reach the bootstrap it mirrors: it tries
        ``attempts`` times (a stream can break under load), 1 s then 2 s apart."""
        for attempt in range(1, (attempts if required else 1) + 1):
            if await self.sync_once() or not required:
                return
            if attempt < attempts:
                await asyncio.sleep(float(attempt))
        raise PeerUnavailable(f"cannot sync with the bootstrap to mirror at {self.mirror} ({attempts} attempts, "
                              "see the log above)")

    async def run_forever(self, dashboard: Callable[[], str | None]) -> None:
        """Sync every ``interval`` s and refresh the record every ``BOOTSTRAPS_TTL / 3`` s (the
        caller published it first)."""
        last_record = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sync_once()
                if time.monotonic() - last_record > BOOTSTRAPS_TTL / 3:
                    await self.publish_record(dashboard())
                    last_record = time.monotonic()
            except Exception as e:  # a DHT hiccup skips one round; the next one catches up
                logger.warning("syncing with the run's other bootstraps failed: %s", e)

    async def publish_record(self, dashboard: str | None, serving: bool = True) -> bool:
        record = BootstrapRecord(peer_id=self.dht.peer_id, maddrs=self.dht.visible_maddrs()[:8],
                                 role="mirror" if self.mirror else "primary", serving=serving,
                                 dashboard=dashboard, updated=get_dht_time())
        ttl = BOOTSTRAPS_TTL if serving else 5.0
        ttl = max(ttl, self._expiration + 1e-3 - get_dht_time())  # a store only replaces a later expiry
        self._expiration = get_dht_time() + ttl
        return await publish_bootstrap(self.dht, record, ttl=ttl)

    async def withdraw(self) -> None:
        """Rewrite the record as not serving, so joiners skip this bootstrap (it expires anyway)."""
        if self._expiration:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.publish_record(None, serving=False), 5.0)


def load_authority(path: Path, given: Path | None, *, mirror: str | None) -> RSAPrivateKey:
    """The run's authority key: ``given`` (``--authority-key``, copied to ``path`` on first use),
    else the one at ``path``, else a new one (a new run). A mirror without a key, a file that is not
    a key, or a key other than the one this state dir already holds, is a ``ConfigError``."""
    where = "<state-dir>/<run>/authority.key of the first bootstrap"
    if given is not None:
        given = given.expanduser()
        if not given.is_file():
            raise ConfigError(f"--authority-key {given}: no such file (copy {where} to this machine)")
        key = _read_key(given)
        if path.is_file() and _read_key(path).to_bytes() != key.to_bytes():
            raise ConfigError(f"--authority-key {given} is not the authority key this state dir already holds "
                              f"({path}): it belongs to another run; use another --state-dir")
        if not path.is_file():
            _write_key(path, key)
        return key
    if path.is_file():
        return _read_key(path)
    if mirror is not None:
        raise ConfigError(f"a mirror needs the run's authority key to issue tokens: copy {where} to this machine "
                          "and pass --authority-key FILE")
    key = RSAPrivateKey()
    _write_key(path, key)
    return key


def _read_key(path: Path) -> RSAPrivateKey:
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    try:
        key.__setstate__({"_private_key": path.read_bytes()})
    except Exception as e:  # OSError, or cryptography's ValueError/TypeError for a file that is not a DER key
        raise ConfigError(f"{path} is not an RSA private key ({type(e).__name__}); expected the authority.key "
                          "file of the run's first bootstrap") from None
    return key


def _write_key(path: Path, key: RSAPrivateKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.to_bytes())


def check_signer(authority: RSAPrivateKey, signers: set[bytes], *, run_id: str, source: str) -> None:
    """``ConfigError`` unless ``authority`` signed the run's manifest (one of ``signers``)."""
    if not signers:
        raise ConfigError(f"run {run_id!r} has no signed manifest at {source}")
    if authority.get_public_key().to_bytes() not in signers:
        raise ConfigError(f"the authority key does not match run {run_id!r}: its manifest at {source} is signed by "
                          "another key. Copy authority.key from that bootstrap's state dir (<state-dir>/<run>/) "
                          "and pass it with --authority-key")
