"""``ContributionRecorder``: turns a peer's served work into signed ledger entries and submits them.

It listens to the peer's ``Activity``; every ``window`` seconds it closes the window with one entry
per stage that saw work (microbatches, tokens, the stage's optimizer steps at both ends), appends
them to the peer's chain file, and sends the entries the bootstrap has not accepted yet. A bootstrap
that is down or refuses costs nothing: the entries stay in the file and go with the next window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Callable, Sequence

from peers.telemetry.activity import RequestDone
from peers.accounting.ledger import LEDGER_SUBMIT, LedgerEntry, LedgerWriter, SubmitRequest, SubmitResponse, Work
from net.rpc import parse_reply
from net.transport import Transport
from core.loop import cancel_and_wait
from core.errors import CapacityExceeded, SwarmError

__all__ = ["ContributionRecorder", "bootstrap_peer_ids"]

logger = logging.getLogger(__name__)


def bootstrap_peer_ids(initial_peers: Sequence[str]) -> list[str]:
    """The peer ids at the end of the ``/p2p/<id>`` multiaddrs a node joined through."""
    return list(dict.fromkeys(addr.rsplit("/p2p/", 1)[-1] for addr in initial_peers if "/p2p/" in addr))


class ContributionRecorder:
    """Windows of one peer's work, written to its ledger and submitted to the bootstrap."""

    def __init__(self, writer: LedgerWriter, *, window: float, step_of: Callable[[int], int],
                 transport: Transport | None = None, bootstrap_ids: Sequence[str] = (),
                 clock: Callable[[], float] = time.time, timeout: float = 10.0,
                 counts: Callable[[int], bool] = lambda stage: True):
        """``counts(stage)`` says whether work on a stage is this peer's own (a stage hosted for a
        delegator is not: the delegator signs that work into its own ledger)."""
        self.writer = writer
        self._counts = counts
        self.window = window
        self.acked_next = 0
        self._step_of = step_of
        self._transport, self._bootstrap_ids = transport, list(bootstrap_ids)
        self._clock, self._timeout = clock, timeout
        self._open: dict[int, Work] = {}
        self._opened = clock()
        self._task: asyncio.Task | None = None

    def observe(self, done: RequestDone) -> None:
        """An ``Activity`` listener: add a served forward/backward to the open window."""
        if not done.ok or done.stage is None or not done.tokens or not self._counts(done.stage):
            return
        work = self._open.get(done.stage)
        if work is None:
            work = self._open[done.stage] = Work(step_from=self._step_of(done.stage))
        work.microbatches += 1
        work.tokens += done.tokens

    def cut(self) -> list[LedgerEntry]:
        """Close the window: one signed entry per stage that saw work."""
        now, opened = self._clock(), self._opened
        work, self._open, self._opened = self._open, {}, now
        entries = []
        for stage, w in sorted(work.items()):
            try:
                entries.append(self.writer.append(stage, w, self._step_of(stage), opened, now))
            except CapacityExceeded:  # a full disk: the work not written stays in the next window
                self._open, self._opened = work, opened
                raise
            del work[stage]
        return entries

    async def submit(self) -> int:
        """Send what the bootstrap lacks; returns how many entries it accepted (0 if unreachable)."""
        pending = self.writer.since(self.acked_next)
        if not pending or self._transport is None or not self._bootstrap_ids:
            return 0
        message = SubmitRequest(entries=pending)
        for attempt, peer in enumerate(self._bootstrap_ids, 1):
            try:
                reply, _ = await self._transport.call(peer, LEDGER_SUBMIT, message, [], timeout=self._timeout)
                response = parse_reply(SubmitResponse, reply)
            except SwarmError as e:  # down, or not a bootstrap: try the next one, then the next window
                logger.debug("ledger submit to %s (attempt %d) failed: %s", peer[-8:], attempt, e)
                continue
            self.acked_next = response.next_seq
            if response.reason:
                logger.warning("the bootstrap refused ledger entries: %s", response.reason)
            return response.accepted
        return 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="contribution-ledger")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.window)
            try:
                self.cut()
                await self.submit()
            except Exception as e:  # a full disk or a bug here must not stop serving
                logger.warning("contribution ledger: %s", e)

    async def stop(self) -> None:
        """Close the last window and give the bootstrap one bounded chance to take it."""
        await cancel_and_wait(self._task)
        self._task = None
        with contextlib.suppress(Exception):  # leaving: the entries are in the file either way
            self.cut()
            await asyncio.wait_for(self.submit(), self._timeout)
