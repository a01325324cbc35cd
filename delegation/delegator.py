"""``Delegator``: a weak machine's part in a run, with a strong peer doing its compute.

    async with Delegator(settings) as delegator:     # a session with the first delegate that takes it
        await delegator.wait_closed()

The delegator keeps its identity: its own DHT node and RSA key, which sign its records and its
ledger, and never leave this machine. It opens a session on a delegate (``delegation.delegate_to``,
tried in order, with ``delegation.token``), then every ``poll_interval`` s it polls the session:

* once the delegate serves the stage, it announces that replica under its own signed record
  (``peer_id`` = the delegate, whom trainers call; ``delegate_of`` = this delegator);
* it signs each batch of new receipts into one entry of its contribution ledger (the receipts'
  digest in it, the delegate noted) and submits the entries the bootstrap lacks; the bootstrap
  credits the delegator.

A delegate that stops answering is reported (``status().delegate_reachable`` False, the record
withdrawn so trainers stop routing there at once); every poll interval the delegator tries the
configured delegates again, in order, and resumes with the first that takes it. A delegator that
dies stops polling: its session expires on the delegate and its record in the DHT.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from typing import Sequence

from hivemind.utils import get_dht_time
from pydantic import Field

from delegation.client import DelegationClient
from delegation.protocol import PollResponse, Receipt, SessionState, StartResponse
from dht.records import SwarmDHT
from core.messages import FrozenModel
from dht.schemas import PeerRecord, PeerState
from net.auth import AuthedTransport, RunAuth
from peers.accounting.contribution import ContributionRecorder, bootstrap_peer_ids
from peers.accounting.ledger import LedgerWriter, Work
from net.transport import P2PTransport
from core.loop import Lifecycle, bounded, cancel_and_wait
from core.config import SwarmSettings
from core.errors import (
    AuthRejected,
    ConfigError,
    DelegationRefused,
    ProtocolMismatch,
    SwarmError,
    UnknownSession,
)
from core.types import PeerId, StageIndex

__all__ = ["Delegator", "DelegatorStatus", "receipts_digest", "delegate_peer_id"]

logger = logging.getLogger(__name__)

_FINAL = (AuthRejected, DelegationRefused, ProtocolMismatch, ConfigError)
"""Refusals that asking the same delegate again would not change (UnknownSession is not one)."""


class DelegatorStatus(FrozenModel):
    """What a delegator reports about itself (``swarm join --delegate-to`` shows it)."""

    delegation_mode: bool = Field(description="this machine has its stage computed by a delegate")
    delegate: PeerId | None = Field(None, description="peer id of the delegate of the current (or last) session")
    delegate_reachable: bool = False
    gpu_count: int | None = Field(None, description="GPUs of the delegate, as it reported them")
    session_id: str | None = None
    stage: StageIndex | None = None
    state: SessionState | None = None
    receipts: int = Field(0, description="receipts signed into the ledger so far")
    tokens: int = 0
    ledger_entries: int = 0
    last_error: str = ""


def receipts_digest(receipts: Sequence[Receipt]) -> str:
    """sha256 of the receipts' canonical JSON: what a ledger entry of delegated work signs."""
    data = [receipt.model_dump(mode="json") for receipt in receipts]
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _Session:
    def __init__(self, delegate: PeerId, started: StartResponse):
        self.delegate, self.started = delegate, started
        self.ack = 0
        self.record: PeerRecord | None = None


class Delegator(Lifecycle):
    """One weak machine delegating its stage. ``start`` / ``stop`` are idempotent."""

    def __init__(self, settings: SwarmSettings, *, manifest_timeout: float = 60.0):
        self.settings = settings
        self.manifest_timeout = manifest_timeout
        self.dht: SwarmDHT | None = None
        self.recorder: ContributionRecorder | None = None
        self._auth: RunAuth | None = None
        self._transport: P2PTransport | None = None
        self._session: _Session | None = None
        self._last: tuple[str | None, int | None] = (None, None)  # delegate and gpu count of the last session
        self._reachable = False
        self._receipts = self._tokens = 0
        self._last_error = ""
        self._task: asyncio.Task | None = None

    @property
    def peer_id(self) -> str:
        assert self.dht is not None, "the delegator has not started"
        return self.dht.peer_id

    @property
    def delegates(self) -> list[str]:
        """Peer ids of the configured delegates, in order."""
        return [delegate_peer_id(address) for address in self.settings.delegation.delegate_to]

    async def start(self) -> None:
        """Join the run and open a first session. A refusal no delegate would change (bad token,
        unsupported stage) raises; unreachable or full delegates are retried every poll interval."""
        await super().start()

    async def _start(self) -> None:
        delegation, net = self.settings.delegation, self.settings.network
        if not delegation.delegate_to:
            raise ConfigError("a delegator needs --delegate-to (delegation.delegate_to): the delegate's multiaddr")
        if not delegation.token:
            raise ConfigError("a delegator needs --delegation-token (delegation.token): the delegate's owner gives it")
        if not net.initial_peers:
            raise ConfigError("a delegator needs --bootstrap (or network.initial_peers) to find the swarm")
        self.dht = await asyncio.to_thread(SwarmDHT.create_client, self.settings.run_id,
                                           [*net.initial_peers, *delegation.delegate_to])
        await self.dht.wait_manifest(self.manifest_timeout)
        self._auth = await RunAuth.join(self.dht, self.settings.key, on_revoked=self._on_key_revoked)
        self._transport = P2PTransport(await self.dht.dht.replicate_p2p())
        self.recorder = self._recorder()
        errors = await self._connect()
        if self._session is None and errors and all(isinstance(e, _FINAL) for e in errors):
            raise errors[0]
        self._task = asyncio.create_task(self._poll_forever(), name="delegator-poll")

    def _recorder(self) -> ContributionRecorder:
        """The ledger of this delegator's delegated work, submitted to the bootstrap like a peer's."""
        folder = self.settings.state_dir.expanduser() / self.settings.run_id / "ledger"
        writer = LedgerWriter(folder / f"{self.peer_id}.jsonl", key=self.dht.signing_key,
                              run_id=self.settings.run_id, peer_id=self.peer_id)
        return ContributionRecorder(writer, window=self.settings.delegation.poll_interval,
                                    step_of=lambda stage: 0, transport=self._calls(),
                                    bootstrap_ids=bootstrap_peer_ids(self.settings.network.initial_peers))

    def _calls(self) -> AuthedTransport | P2PTransport:
        """The transport for calls to the run's gated handlers: a keyed run presents the token first."""
        return self._transport if self._auth is None else AuthedTransport(self._transport, self._auth.token_text)

    def _client(self, delegate: PeerId) -> DelegationClient:
        return DelegationClient(self._calls(), delegate)

    # -- sessions ---------------------------------------------------------------------------------

    async def _connect(self) -> list[SwarmError]:
        """Open a session with the first configured delegate that takes it; the errors of the others."""
        errors: list[SwarmError] = []
        delegation = self.settings.delegation
        for delegate in self.delegates:
            try:
                started = await self._client(delegate).start(delegation.token, self.peer_id, delegation.stage)
            except SwarmError as e:
                logger.warning("delegate %s did not open a session: %s: %s", delegate[-8:], type(e).__name__, e)
                errors.append(e)
                continue
            previous = self._session
            self._session = _Session(delegate, started)
            if previous is not None and previous.started.session_id == started.session_id:
                self._session.ack = previous.ack  # the same session, back after a lost reply
            self._reachable, self._last, self._last_error = True, (delegate, started.gpu_count), ""
            logger.info("delegation session %s on %s: stage %d (layers %s), %d GPU(s)", started.session_id[:8],
                        delegate[-8:], started.stage, started.layers, started.gpu_count)
            return []
        self._reachable = False
        self._last_error = "; ".join(f"{type(e).__name__}: {e}" for e in errors)
        return errors

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.delegation.poll_interval)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a DHT hiccup, a full disk: the next poll tries again
                logger.warning("delegation poll failed: %s: %s", type(e).__name__, e)

    async def tick(self) -> None:
        """One poll: receipts into the ledger, the record refreshed; or, without a session (or after
        losing it), another try at the delegates in order."""
        session = self._session
        if session is None:
            await self._connect()
            return
        try:
            response = await self._client(session.delegate).poll(session.started.session_id, session.ack)
        except UnknownSession as e:
            logger.warning("delegation session lost: %s; opening another", e)
            await self._lose(session, str(e))
            await self._connect()
            return
        except SwarmError as e:
            logger.warning("delegate %s unreachable: %s: %s", session.delegate[-8:], type(e).__name__, e)
            await self._lose(session, f"delegate unreachable: {e}")
            await self._connect()
            return
        self._reachable = True
        self._last = (session.delegate, response.gpu_count)
        await self._take_receipts(session, response.receipts)
        await self._announce(session, response)

    async def _lose(self, session: _Session, why: str) -> None:
        """The session is gone or its delegate unreachable: trainers must stop routing there now."""
        self._session, self._reachable, self._last_error = None, False, why
        if session.record is not None:
            with contextlib.suppress(Exception):  # the record expires anyway
                await asyncio.wait_for(self.dht.withdraw(session.record), 5)

    async def _announce(self, session: _Session, response: PollResponse) -> None:
        """The delegate's replica under this delegator's signed record, once it is served."""
        if response.state != SessionState.ACTIVE or response.record is None:
            return
        offered = response.record
        if offered.peer_id != session.delegate or offered.stage != session.started.stage:
            raise ProtocolMismatch(f"delegate {session.delegate[-8:]} described peer {offered.peer_id[-8:]} stage "
                                   f"{offered.stage}, not itself at stage {session.started.stage}")
        record = offered.model_copy(update={
            "delegate_of": self.peer_id, "state": PeerState.ONLINE, "updated": get_dht_time(),
            "access_token": self._auth.token if self._auth is not None else None,
        })
        if await self.dht.announce(record):
            session.record = record
        else:
            logger.warning("the DHT did not store the record of stage %d (retried next poll)", record.stage)

    async def _take_receipts(self, session: _Session, receipts: Sequence[Receipt]) -> None:
        """Sign the new receipts into one ledger entry, keep them beside the ledger, submit."""
        fresh = [r for r in receipts if r.seq >= session.ack]
        if not fresh:
            return
        digest = receipts_digest(fresh)
        work = Work(microbatches=len({r.request_id for r in fresh}), tokens=sum(r.tokens for r in fresh),
                    step_from=session.record.step if session.record is not None else 0)
        entry = self.recorder.writer.append(session.started.stage, work, work.step_from, min(r.at for r in fresh),
                                            max(r.at for r in fresh), delegate=session.delegate, receipts=digest)
        self._keep_receipts(entry.seq, fresh)
        session.ack = fresh[-1].seq + 1
        self._receipts += len(fresh)
        self._tokens += work.tokens
        await self.recorder.submit()

    def _keep_receipts(self, seq: int, receipts: Sequence[Receipt]) -> None:
        """The receipts an entry signs, beside the ledger (``<peer>.receipts.jsonl``), so its digest
        can be checked later."""
        path = self.recorder.writer.path.with_suffix(".receipts.jsonl")
        with path.open("a") as f:
            f.write(json.dumps({"entry": seq, "receipts": [r.model_dump(mode="json") for r in receipts]}) + "\n")

    # -- status and lifecycle ---------------------------------------------------------------------

    def status(self) -> DelegatorStatus:
        session = self._session
        delegate, gpus = self._last
        return DelegatorStatus(
            delegation_mode=True, delegate=delegate, delegate_reachable=self._reachable, gpu_count=gpus,
            session_id=session.started.session_id if session else None,
            stage=session.started.stage if session else self.settings.delegation.stage,
            state=SessionState.ACTIVE if session and session.record else (SessionState.LOADING if session else None),
            receipts=self._receipts, tokens=self._tokens,
            ledger_entries=len(self.recorder.writer.entries) if self.recorder else 0, last_error=self._last_error,
        )

    def _on_key_revoked(self) -> None:
        logger.error("this delegator's API key was revoked: it leaves the swarm")
        asyncio.get_running_loop().create_task(self.stop(), name="delegator-leave-revoked-key")

    async def stop(self) -> None:
        """Stop the session (its last receipts signed and submitted), withdraw the record, leave."""
        if self._closed.is_set():
            return
        await bounded(cancel_and_wait(self._task), 5, "the delegation poll")
        self._task = None
        session, self._session = self._session, None
        if session is not None:
            await bounded(self._stop_session(session), 20, "closing the delegation session")
        if self.recorder is not None:
            await bounded(self.recorder.stop(), 10, "the ledger's last submission")
        if self._auth is not None:
            await bounded(self._auth.stop(), 5, "the access token's renewal")
        if self._transport is not None:
            await self._transport.close()
        if self.dht is not None:
            await bounded(asyncio.to_thread(self.dht.shutdown), 10, "the DHT")
        self._mark_closed()
        logger.info("delegator stopped")

    async def _stop_session(self, session: _Session) -> None:
        with contextlib.suppress(SwarmError, asyncio.TimeoutError):  # gone already: it expires by itself
            stopped = await asyncio.wait_for(
                self._client(session.delegate).stop(session.started.session_id, session.ack), 15)
            await self._take_receipts(session, stopped.receipts)
        if session.record is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.dht.withdraw(session.record), 5)


def delegate_peer_id(address: str) -> str:
    """The peer id at the end of a delegate's multiaddr (``.../p2p/<id>``)."""
    if "/p2p/" not in address:
        raise ConfigError(f"--delegate-to {address!r} lacks the peer id: expected /ip4/HOST/tcp/PORT/p2p/PEER_ID")
    return address.rsplit("/p2p/", 1)[-1]
