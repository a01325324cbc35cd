"""Which replica of each stage the trainer calls, and which it leaves out: the view of the DHT's
records, the bans of peers that failed and their probes back in, and the routes planned over what
is left (``peers.training.routing.plan_route``). Also what each replica last said its optimizer step is, and
the run's step learned from them.

A dropped peer comes back into routes only once it answers (``info``) after its ban: a dead peer's
record stays in the DHT up to ``RECORD_TTL`` after its last refresh, which may outlast the ban, and
dialing it again spent the calls of the very microbatch that waited for its stage (issue 21)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from typing import Awaitable, Callable, Collection, Mapping, Sequence

from dht.schemas import RECORD_TTL, PeerRecord, PeerState
from peers.training.client import StageInputs
from peers.training.routing import Hop, plan_route
from core.errors import InvalidOutput, NoRoute
from trainer.faults import EARLY_PROBE, STALE_RECHECK, Readmission, after_probe, ban_seconds
from trainer.traces import Wiring
from core.types import PeerId, StageIndex

__all__ = ["Replicas", "RecordSource"]

logger = logging.getLogger(__name__)

RecordSource = Callable[[], Awaitable[Mapping[int, Sequence[PeerRecord]]]]
"""Returns the current peer records per stage (the DHT in real use, a dict in unit tests)."""


class Replicas:
    """The replicas of a run's stages as one trainer sees them: read from ``source`` again in the
    background once the view is ``route_ttl`` s old and at every step (``step_view``), and at once
    after a peer in view failed, minus the peers it left out; ``route_wait`` bounds its wait for a
    stage nobody serves. ``cached=False``: every read is waited for, as before issue 27."""

    def __init__(self, wiring: Wiring, source: RecordSource, *, route_ttl: float = 10.0,
                 route_wait: float = 120.0, seed: int | None = None, cached: bool = True):
        self.wiring = wiring
        self.source = source
        self.route_ttl, self.route_wait = route_ttl, route_wait
        self.cached = cached  # False: every step and every expired view waits for its read (the old way)
        self.background_reads = 0  # reads done while the trainer went on with the view it had
        self._refreshing: asyncio.Task | None = None  # the background read under way, if any
        self._stale = False  # a peer in view failed a call since the last read
        self.rng = random.Random(seed)  # routes and dropout seeds alike, so a seeded run repeats
        self.step: int | None = None  # the run's collaborative step, learned from the replicas
        self.peer_steps: dict[str, int] = {}  # the optimizer step each replica last answered at
        self.records: Mapping[int, Sequence[PeerRecord]] = {}
        self._records_time = float("-inf")
        self._banned: dict[str, float] = {}  # peer -> when its ban ends
        self._dropped: dict[str, BaseException] = {}  # banned peers -> why, until one answers a probe after its ban
        self._probed: dict[str, tuple[float, float]] = {}  # dropped peer -> (last early probe, seconds to the next)
        self._queue: Counter[str] = Counter()  # microbatches routed to each peer since the records were read
        self._overhead_ms: dict[str, float] = {}  # observed round trip beyond compute, per peer
        self._seen: dict[tuple[str, int], tuple[float, PeerRecord]] = {}  # (peer id, stage) -> (when, its last record)

    async def current(self, *, fresh: bool = False) -> Mapping[int, Sequence[PeerRecord]]:
        """The records in view. The caller waits for a read when ``fresh``, when there is no view yet,
        when a peer in view failed a call since the last read (``ban``: a cached route that failed
        falls back to a fresh read), or, uncached, when the view is older than ``route_ttl``. Cached,
        an older view is returned as it is and replaced by a read in the background."""
        if fresh or self._stale or self._records_time == float("-inf"):
            return await self._read_now()
        if time.monotonic() - self._records_time >= self.route_ttl:
            if not self.cached:
                return await self._read_now()
            self.renew()
        return self.records

    async def step_view(self) -> Mapping[int, Sequence[PeerRecord]]:
        """The records a step's members are taken from. Uncached: read now, as the step waits. Cached:
        the view as it is (read during the previous step at the latest), and a read in the background
        for the next step, so no DHT round trip sits between a step's last backward and its
        application. A replica that joined since that read misses this step and catches up by itself
        (``peers.state.resync``); a dead one in view fails the pre-step probe or its step call."""
        if not self.cached:
            return await self._read_now()
        view = await self.current()
        self.renew()
        return view

    def renew(self) -> None:
        """Start reading the records in the background, unless a read is under way."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._read_behind())

    async def close(self) -> None:
        """Cancel a background read still under way (before the DHT it reads is stopped)."""
        task, self._refreshing = self._refreshing, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _read_now(self) -> Mapping[int, Sequence[PeerRecord]]:
        started = time.perf_counter()
        try:
            return await self._read()
        finally:
            self.wiring.timings["dht"] += time.perf_counter() - started

    async def _read_behind(self) -> None:
        try:
            await self._read()
            self.background_reads += 1
        except Exception as e:  # the view in hand stays; the next step or expiry reads again
            logger.warning("reading the peers' records in the background failed: %s: %s", type(e).__name__, e)

    async def _read(self) -> Mapping[int, Sequence[PeerRecord]]:
        stale = self._stale
        self._stale = False  # a ban during the read marks the view stale again
        try:
            records = await self.source()
        except BaseException:
            self._stale = self._stale or stale
            raise
        self.records = self._with_recently_seen(records)
        self._records_time = time.monotonic()
        self._queue.clear()  # microbatches spread over replicas afresh with each new view
        return self.records

    def _with_recently_seen(self, records: Mapping[int, Sequence[PeerRecord]]) -> dict[int, list[PeerRecord]]:
        """A DHT read under load can miss some of a key's entries. A replica missing from one read is
        still a replica: left out of a step's members it would miss that step and fall behind, so
        records seen within ``RECORD_TTL`` stay in the view (a dead one fails the pre-step probe). Kept
        per peer and stage: a peer serving several stages has a record under each."""
        now = time.monotonic()
        merged = {stage: list(rs) for stage, rs in records.items()}
        present = {(r.peer_id, r.stage) for rs in merged.values() for r in rs}
        for key, (seen, record) in list(self._seen.items()):
            if now - seen > RECORD_TTL or key[0] in self._dropped:  # a dropped peer's record: only while the DHT has it
                del self._seen[key]
            elif key not in present:
                merged.setdefault(record.stage, []).append(record)
        for rs in records.values():
            for record in rs:
                self._seen[(record.peer_id, record.stage)] = (now, record)
        return merged

    def banned(self) -> set[str]:
        """Peers left out of routes and steps: those banned, and those whose ban ended that have not
        answered a probe since (``readmit``) while a record of theirs is still in view."""
        now = time.monotonic()
        self._banned = {peer: until for peer, until in self._banned.items() if until > now}
        in_view = self._in_view()
        self._dropped = {peer: why for peer, why in self._dropped.items() if peer in self._banned or peer in in_view}
        self._probed = {peer: when for peer, when in self._probed.items() if peer in self._dropped}
        return set(self._banned) | set(self._dropped)

    def _in_view(self) -> set[str]:
        return {r.peer_id for rs in self.records.values() for r in rs}

    def ban(self, peer_id: PeerId, why: BaseException) -> None:
        """Leave ``peer_id`` out of routes and steps for ``trainer.faults.ban_seconds``, then until it
        answers a probe at the run's step: a replica left out only for being behind is back within
        seconds (a churn run lost 6 steps when the other replica of its stage died meanwhile)."""
        ban = ban_seconds(why, self.wiring.policy)
        logger.warning("leaving peer %s out for %.0f s, and until it answers: %s: %s", peer_id[-8:], ban,
                       type(why).__name__, why)
        self._banned[peer_id] = time.monotonic() + ban
        self._dropped[peer_id] = why
        self._stale = True

    async def readmit(self, unserved: Collection[int] = ()) -> None:
        """Probe (``info``, bounded by ``policy.probe_timeout``) the dropped peers whose ban has ended
        and whose record is still in view: one that answers is back in routes, one that does not is
        banned again. A dead peer's record outlives it in the DHT (up to ``RECORD_TTL`` after its last
        refresh): without this, a ban shorter than that sent real work to it again, and the calls it
        failed counted against the microbatch that was waiting for its stage to be taken over.

        A banned replica of a stage in ``unserved`` (nobody else serves it) is probed before its ban
        ends (``EARLY_PROBE`` s apart, doubling while it does not answer), unless a spot check or a
        sanity check caught it: with no other replica to route to, the ban protects nothing, and
        waiting it out cost 42 s of training in a churn run (the last live replica of stage 0 had been
        banned for a failed averaging round). Behind, it adopts the run's step as a lone replica does."""
        policy = self.wiring.policy
        now = time.monotonic()
        self.banned()
        urgent = {r.peer_id for stage in unserved for r in self.records.get(stage, ())
                  if r.state == PeerState.ONLINE and r.layers == self.wiring.manifest.stages[stage]}
        early = sorted(peer for peer, why in self._dropped.items()
                       if peer in urgent and self._banned.get(peer, now) > now and not isinstance(why, InvalidOutput)
                       and now - sum(self._probed.get(peer, (float("-inf"), 0.0))) >= 0)
        due = sorted(set(early) | {peer for peer in self._dropped if self._banned.get(peer, now) <= now})
        if not due:
            return
        for peer in early:
            logger.warning("peer %s is the only replica left of its stage: asking whether it answers before its "
                           "ban ends", peer[-8:])
            self._probed[peer] = (now, 2 * self._probed[peer][1] if peer in self._probed else EARLY_PROBE)
        for peer in due:  # being probed: another route planned meanwhile neither probes nor uses it
            self._banned[peer] = now + policy.probe_timeout
        stage_of = {r.peer_id: r.stage for rs in self.records.values() for r in rs}
        answers = await asyncio.gather(*(asyncio.wait_for(self.wiring.client.info(peer, stage_of.get(peer)),
                                                          policy.probe_timeout) for peer in due),
                                       return_exceptions=True)
        for peer, answer in zip(due, answers):
            outcome = after_probe(answer if isinstance(answer, BaseException) else answer.optimizer_step,
                                  self._dropped.get(peer), self.step, alone=peer in urgent)
            if outcome is Readmission.BAN_AGAIN:
                self._banned[peer] = time.monotonic() + policy.ban_time
                logger.warning("peer %s still does not answer (%s); its record is still in the DHT: left out "
                               "another %.0f s", peer[-8:], type(answer).__name__, policy.ban_time)
            elif outcome is Readmission.RECHECK:
                self._banned[peer] = time.monotonic() + STALE_RECHECK  # still catching up
            else:
                self._banned.pop(peer, None)
                self._dropped.pop(peer, None)
                self._probed.pop(peer, None)
                self.peer_steps[peer] = answer.optimizer_step
                logger.info("peer %s answers again (at step %d): back in routes", peer[-8:], answer.optimizer_step)

    async def route(self, tokens: int = 1) -> tuple[Hop, ...]:
        """A peer for every stage by expected time (throughput, microbatches already sent there since
        the records were read, the round trip observed beyond compute), waiting (bounded, and saying
        so) for stages nobody serves."""
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            records = await self.current(fresh=attempt > 1)  # waiting: the DHT read afresh each time
            await self.readmit(self._unserved(records) if attempt > 1 else ())
            try:
                route = plan_route(self.wiring.manifest.stages, records, banned=self.banned(), rng=self.rng,
                                   tokens=tokens, queue=self._queue, latency_ms=self._overhead_ms)
            except NoRoute as e:
                waited = time.monotonic() - started
                if waited > self.route_wait:
                    raise NoRoute(f"{e} (waited {self.route_wait:.0f} s; {self._left_out()})") from None
                if attempt == 1 or attempt % 10 == 0:
                    logger.warning("waiting for a peer to take over: %s; %s (attempt %d, %.0f of %.0f s)", e,
                                   self._left_out(), attempt, waited, self.route_wait)
                await asyncio.sleep(min(0.25 * attempt, 2.0))
                continue
            if attempt > 1:
                logger.warning("every stage is served again after %.1f s (attempt %d): %s",
                               time.monotonic() - started, attempt,
                               ", ".join(f"stage {hop.stage} by {hop.peer_id[-8:]}" for hop in route))
            return route

    async def plan_routes(self, parts: Sequence[StageInputs]) -> list[tuple[Hop, ...]]:
        """Each microbatch's route, planned before any is sent, each counting those planned before it
        (so replicas share the work)."""
        routes = []
        for hidden, _, _ in parts:
            routes.append(await self.route(hidden.shape[0] * hidden.shape[1]))
            self._queue.update({hop.peer_id for hop in routes[-1]})  # the next microbatch weighs this one in
        return routes

    def _unserved(self, records: Mapping[int, Sequence[PeerRecord]]) -> list[int]:
        """The stages no online, unbanned peer serves in ``records``."""
        banned = self.banned()
        return [stage for stage, layers in enumerate(self.wiring.manifest.stages)
                if not any(r.state == PeerState.ONLINE and r.layers == layers and r.peer_id not in banned
                           for r in records.get(stage, ()))]

    def _left_out(self) -> str:
        """The dropped peers and why, for the logs of a trainer waiting for a stage."""
        banned = self.banned()
        if not banned:
            return "no peer is left out"
        why = {peer: f"{type(e).__name__}: {e}" for peer, e in self._dropped.items()}
        return "left out: " + "; ".join(f"{peer[-8:]} ({why.get(peer, 'banned')})" for peer in sorted(banned))

    def observe(self, peer_id: PeerId, seconds: float, tokens: int) -> None:
        """Remember how much longer than its compute a call to ``peer_id`` took (network, queues): a
        moving average in ms that routing adds to the peer's expected time."""
        throughput = next((r.throughput for found in self.records.values() for r in found
                           if r.peer_id == peer_id), 0.0)
        compute = tokens / throughput if throughput > 0 else 0.0
        overhead_ms = max(seconds - compute, 0.0) * 1000
        previous = self._overhead_ms.get(peer_id)
        self._overhead_ms[peer_id] = overhead_ms if previous is None else 0.7 * previous + 0.3 * overhead_ms

    async def pick(self, stage: StageIndex) -> str:
        """A replica of ``stage`` to call, as a route would pick it."""
        return (await self.route())[stage].peer_id

    def live(self, stage: StageIndex) -> list[str]:
        """The online, unbanned replicas of ``stage`` in view."""
        layers = self.wiring.manifest.stages[stage]
        banned = self.banned()
        return [r.peer_id for r in self.records.get(stage, ())
                if r.state == PeerState.ONLINE and r.layers == layers and r.peer_id not in banned]
