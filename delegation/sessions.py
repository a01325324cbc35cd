"""The delegate's side of delegation: who may open a session, how many, for how long, and the
receipts of the work done in each.

``DelegateSessions`` holds the sessions of one delegate and decides everything about them; the RPC
handlers (``delegation.service``) only parse and call it. The stage itself is loaded and served by a
``StageHost`` (a ``Peer``'s ``peers.delegate_host.DelegateHost`` is one): a session is one stage hosted on the delegator's behalf.

Rules:

* a start needs a token this delegate accepts (``TokenSet``: every accepted token is compared in
  constant time), a caller that is the delegator it names, a free session (``max_sessions``) and a
  stage the host can take; a delegator that already holds a live session here gets that one back
  (so a start whose reply was lost can be retried);
* a session lives while it is polled: one not polled for ``ttl`` seconds expires, one whose token is
  no longer accepted is revoked; either way its stage is released and later calls about it get
  ``UnknownSession`` naming why;
* each forward/backward the hosted stage answers becomes a ``Receipt`` (request id, tokens, sha256 of
  the output) kept until the delegator acknowledges it (at most ``MAX_PENDING``; older ones are
  dropped and counted, so a delegator that never polls cannot fill the delegate's memory).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Protocol, Sequence

import torch

from dht.schemas import PeerRecord
from delegation.protocol import (
    LIVE_STATES,
    MAX_RECEIPTS,
    DelegateStatus,
    PollRequest,
    PollResponse,
    Receipt,
    SessionInfo,
    SessionState,
    StartRequest,
    StartResponse,
    StopRequest,
    StopResponse,
)
from peers.telemetry.activity import work_of
from peers.training.protocol import BackwardRequest, ForwardRequest
from core.types import LayerRange, PeerId, StageIndex
from core.loop import cancel_and_wait
from core.errors import AuthRejected, CapacityExceeded, UnknownSession

__all__ = ["StageHost", "TokenSet", "DelegateSessions", "tensor_digest", "MAX_PENDING"]

logger = logging.getLogger(__name__)

MAX_PENDING = 100_000
"""Receipts a session keeps unacknowledged (about 15 MB); beyond that the oldest are dropped."""
ENDED_KEPT = 64
"""Ended sessions remembered, so a late poll learns why its session is gone and status shows them."""


class StageHost(Protocol):
    """What a delegate needs from the peer it runs in (``peers.delegate_host.DelegateHost``, a ``Peer``'s ``delegate``)."""

    @property
    def peer_id(self) -> str: ...

    async def stage_to_host(self, wanted: int | None, *, taken: Collection[int] = ()) -> int: ...

    async def host_stage(self, stage: StageIndex, *, on_behalf_of: str, on_work: Callable) -> None: ...

    async def release_stage(self, stage: StageIndex) -> None: ...

    def hosted_record(self, stage: StageIndex) -> PeerRecord | None: ...

    def stage_layers(self, stage: StageIndex) -> LayerRange: ...

    def gpu_count(self) -> int: ...


class TokenSet:
    """The delegation tokens a delegate accepts: the configured ones plus the lines of ``path``,
    re-read when the file changes (removing a line revokes that token)."""

    def __init__(self, tokens: Sequence[str] = (), path: Path | None = None):
        self._fixed = [t for t in tokens if t]
        self.path = path
        self._from_file: list[str] = []
        self._mtime: float | None = None
        self.reload()

    def reload(self) -> None:
        """Re-read the tokens file if it changed; a missing file holds no tokens."""
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            mtime = None
        if mtime == self._mtime:
            return
        self._mtime = mtime
        text = self.path.read_text() if mtime is not None else ""
        self._from_file = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]

    def accepts(self, token: str) -> bool:
        """Whether ``token`` is one of the accepted ones. Every candidate is compared, each in constant
        time (``hmac.compare_digest`` on their SHA-256), so the time taken says nothing about how much
        of a token was right."""
        offered = hashlib.sha256(token.encode()).digest()
        found = False
        for candidate in [*self._fixed, *self._from_file]:
            found |= hmac.compare_digest(offered, hashlib.sha256(candidate.encode()).digest())
        return found

    def __bool__(self) -> bool:
        return bool(self._fixed or self._from_file)


@dataclass
class _Session:
    session_id: str
    delegator: PeerId
    stage: StageIndex
    token: str
    created: float
    last_poll: float
    state: SessionState = SessionState.LOADING
    reason: str = ""
    receipts: deque[Receipt] = field(default_factory=deque)
    next_seq: int = 0
    dropped: int = 0
    tokens: int = 0
    request_ids: set[str] = field(default_factory=set)
    loading: asyncio.Task | None = None


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as they are in memory (any dtype)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


class DelegateSessions:
    """Every session of one delegate. ``start()`` runs the sweeper; ``stop()`` ends every session."""

    def __init__(self, host: StageHost, tokens: TokenSet, *, max_sessions: int = 10, ttl: float = 330.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.host, self.tokens = host, tokens
        self.max_sessions, self.ttl = max_sessions, ttl
        self.total = 0
        self._clock, self._wall = clock, wall
        self._live: dict[str, _Session] = {}
        self._ended: OrderedDict[str, _Session] = OrderedDict()
        self._sweeper: asyncio.Task | None = None
        self._starting = asyncio.Lock()

    # -- the RPCs' logic --------------------------------------------------------------------------

    async def open(self, request: StartRequest, caller: PeerId | None) -> StartResponse:
        if not self.tokens.accepts(request.token):
            raise AuthRejected("this delegate does not accept that delegation token")
        if caller is not None and caller != request.delegator:
            raise AuthRejected(f"peer {caller[-12:]} asked for a session for {request.delegator[-12:]}: "
                               "a delegator opens its own sessions")
        async with self._starting:  # one start at a time: two must not pick the same stage
            session = self._held_by(request.delegator, request.stage)
            if session is None:
                if len(self._live) >= self.max_sessions:
                    raise CapacityExceeded(f"delegate {self.host.peer_id[-8:]} is at capacity: "
                                           f"{len(self._live)} of {self.max_sessions} sessions in use")
                taken = {s.stage for s in self._live.values()}  # sessions still loading are not hosted yet
                session = self._new(request, await self.host.stage_to_host(request.stage, taken=taken))
        return StartResponse(session_id=session.session_id, stage=session.stage,
                             layers=self.host.stage_layers(session.stage), ttl=self.ttl, gpu_count=self.host.gpu_count())

    def poll(self, request: PollRequest, caller: PeerId | None) -> PollResponse:
        session = self._session(request.session_id, caller)
        session.last_poll = self._clock()
        self._acknowledge(session, request.ack)
        record = self.host.hosted_record(session.stage) if session.state == SessionState.ACTIVE else None
        return PollResponse(
            session_id=session.session_id, state=session.state, record=record,
            receipts=list(session.receipts)[:MAX_RECEIPTS], dropped=session.dropped,
            expires_in=self.ttl, gpu_count=self.host.gpu_count(), reason=session.reason,
        )

    async def close(self, request: StopRequest, caller: PeerId | None) -> StopResponse:
        session = self._session(request.session_id, caller)
        self._acknowledge(session, request.ack)
        receipts = list(session.receipts)[:MAX_RECEIPTS]
        await self._end(session, SessionState.STOPPED, "stopped by its delegator")
        return StopResponse(session_id=session.session_id, receipts=receipts)

    def status(self) -> DelegateStatus:
        now, gpus = self._clock(), self.host.gpu_count()
        sessions = [*self._live.values(), *reversed(self._ended.values())]
        return DelegateStatus(
            peer_id=self.host.peer_id, total_sessions=self.total, active_sessions=len(self._live),
            max_sessions=self.max_sessions, gpu_count=gpus,
            sessions=[SessionInfo(session_id=s.session_id, status=s.state, delegator=s.delegator, stage=s.stage,
                                  gpu_count=gpus, microbatches=len(s.request_ids), tokens=s.tokens,
                                  age_s=round(now - s.created, 1), reason=s.reason) for s in sessions],
        )

    # -- sessions ---------------------------------------------------------------------------------

    def _held_by(self, delegator: PeerId, stage: StageIndex | None) -> _Session | None:
        """The live session ``delegator`` already holds here (for ``stage``, if it names one)."""
        return next((s for s in self._live.values()
                     if s.delegator == delegator and (stage is None or s.stage == stage)), None)

    def _new(self, request: StartRequest, stage: StageIndex) -> _Session:
        now = self._clock()
        session = _Session(secrets.token_hex(16), request.delegator, stage, request.token, now, now)
        self._live[session.session_id] = session
        self.total += 1
        session.loading = asyncio.create_task(self._load(session), name=f"delegation-load-{stage}")
        logger.info("delegation session %s: stage %d for %s", session.session_id[:8], stage, request.delegator[-8:])
        return session

    async def _load(self, session: _Session) -> None:
        """Load the stage after the start's reply went out (loading takes seconds or minutes)."""
        try:
            await self.host.host_stage(session.stage, on_behalf_of=session.delegator,
                                       on_work=lambda *work: self._record(session, *work))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a stage that cannot be loaded ends the session, not the delegate
            logger.warning("delegation session %s: loading stage %d failed: %s", session.session_id[:8],
                           session.stage, e)
            session.loading = None
            await self._end(session, SessionState.FAILED, f"loading stage {session.stage} failed: {e}")
            return
        session.loading = None
        if session.session_id in self._live:
            session.state = SessionState.ACTIVE
        else:  # ended while it loaded
            await self.host.release_stage(session.stage)

    def _session(self, session_id: str, caller: PeerId | None) -> _Session:
        session = self._live.get(session_id)
        if session is None:
            ended = self._ended.get(session_id)
            why = f"it ended: {ended.reason}" if ended else "this delegate never issued it or has restarted"
            raise UnknownSession(f"no delegation session {session_id[:8]}… on {self.host.peer_id[-8:]}: {why}")
        if caller is not None and caller != session.delegator:
            raise AuthRejected(f"session {session_id[:8]}… belongs to another delegator")
        return session

    def _acknowledge(self, session: _Session, ack: int) -> None:
        while session.receipts and session.receipts[0].seq < ack:
            session.receipts.popleft()

    async def _record(self, session: _Session, method: str, request: ForwardRequest | BackwardRequest,
                      tensors: list[torch.Tensor], reply: dict, out: list[torch.Tensor]) -> None:
        """A receipt for one forward/backward the hosted stage answered."""
        kind = method.rsplit(".", 1)[-1]
        _, _, tokens = work_of(kind, request, tensors)
        digest = await asyncio.to_thread(tensor_digest, out[0]) if out else hashlib.sha256(b"").hexdigest()
        request_id = request.request_id
        session.receipts.append(Receipt(seq=session.next_seq, request_id=request_id, kind=kind, tokens=tokens,
                                        digest=digest, at=self._wall()))
        session.next_seq += 1
        session.tokens += tokens
        session.request_ids.add(request_id)
        if len(session.receipts) > MAX_PENDING:
            session.receipts.popleft()
            session.dropped += 1

    async def _end(self, session: _Session, state: SessionState, reason: str) -> None:
        """Release the session's stage and remember why it ended."""
        if self._live.pop(session.session_id, None) is None:
            return
        session.state, session.reason = state, reason
        self._ended[session.session_id] = session
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)
        if session.loading is not None:
            await cancel_and_wait(session.loading)
        await self.host.release_stage(session.stage)
        logger.info("delegation session %s (stage %d, %s) %s: %s", session.session_id[:8], session.stage,
                    session.delegator[-8:], state.value, reason)

    # -- expiry and revocation --------------------------------------------------------------------

    async def sweep(self) -> None:
        """End sessions not polled for ``ttl`` s, and those whose token is no longer accepted."""
        self.tokens.reload()
        now = self._clock()
        for session in list(self._live.values()):
            if not self.tokens.accepts(session.token):
                await self._end(session, SessionState.REVOKED, "its delegation token was revoked")
            elif now - session.last_poll > self.ttl:
                await self._end(session, SessionState.EXPIRED, f"not polled for {self.ttl:.0f} s")

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="delegation-sweeper")

    async def _sweep_forever(self) -> None:
        period = min(5.0, self.ttl / 4)
        while True:
            await asyncio.sleep(period)
            try:
                await self.sweep()
            except Exception as e:  # a tokens file mid-write, a release that failed: the next sweep retries
                logger.warning("delegation sweep: %s: %s", type(e).__name__, e)

    async def stop(self) -> None:
        """End every session (the delegate leaves). Idempotent."""
        await cancel_and_wait(self._sweeper)
        self._sweeper = None
        for session in list(self._live.values()):
            await self._end(session, SessionState.STOPPED, "the delegate stopped")

    @property
    def live(self) -> list[str]:
        """Ids of the sessions loading or active now."""
        return [s.session_id for s in self._live.values() if s.state in LIVE_STATES]
