"""``Rebalancer``: where a serving peer's span goes, on join and while it serves (``shards.placement``
decides; this carries the decisions out over the DHT).

On join the peer claims the span of one or more consecutive stages (at most ``peer.max_stages``, as
many as its memory holds) that raises the bottleneck most; peers that found a stage nobody serves
settle their claims together. Every ``rebalance_period`` (randomised) it asks ``should_move``; a peer
with a move waits a delay that shrinks with its gain and asks again (so the one that gains most goes
first and the others see its claim), then moves its whole span: it announces ``loading`` for the new
stages, ``draining`` for the old ones (trainers stop routing to them), drains in-flight requests, loads
the new span and announces it online. The lone replica of each other stage is probed, so a stage whose
only peer was killed shows as empty and is refilled.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from typing import Callable, Collection, Mapping, Sequence

from hivemind.utils import get_dht_time

from dht.records import SwarmDHT
from dht.schemas import Manifest, PeerRecord, PeerState
from peers.joining.claims import joiners_in, loads_without, replica_cost
from peers.training.client import StageClient
from peers.dispatch import StageRouter
from peers.hosting import StageHost, span_layers
from peers.joining.measure import Measurement
from peers.joining.reachability import explain_placement
from shards.placement import (
    Joiner,
    Move,
    PlacedPeer,
    ReplicaCost,
    Span,
    choose_stages,
    effective_loads,
    plan_joiners,
    rebalancing_needed,
    should_move,
)
from core.loop import TaskSet
from core.config import SwarmSettings
from core.errors import ConfigError, InsufficientMemory, SwarmError

__all__ = ["Rebalancer"]

logger = logging.getLogger(__name__)


class Rebalancer:
    """Chooses, settles and changes ``host``'s span. ``claim_reason`` says why the span is what it is
    (for ``swarm join``'s view), ``moves`` lists the moves made. ``start`` runs the periodic checks as
    a task of the peer's ``TaskSet``; ``on_moved(added)`` is told of each move's new stages."""

    def __init__(self, settings: SwarmSettings, dht: SwarmDHT, manifest: Manifest, measurement: Measurement,
                 host: StageHost, router: StageRouter, *, on_moved: Callable[[list[int]], None]):
        self.settings, self.dht, self.manifest, self.measurement = settings, dht, manifest, measurement
        self.host, self.router, self._on_moved = host, router, on_moved
        self.claim_reason = ""
        self.found_empty = False  # a stage had no peer when this one chose: peers joining with it are planned as a group
        self.moves: list[Move] = []
        self.unanswered: Counter[str] = Counter()  # lone replicas of other stages that did not answer a probe
        self._rebalancing = False
        self._started = False
        self._moving = asyncio.Lock()  # one move at a time: each reads the span the last one left

    def gone(self) -> set[str]:
        """Peers whose stage's probe they missed twice in a row: killed, their records outliving them."""
        return {peer for peer, missed in self.unanswered.items() if missed >= 2}

    @property
    def _cost(self) -> ReplicaCost:
        return replica_cost(self.manifest, self.host.stage_bytes, self.settings.peer, self.measurement.bandwidth_mbps)

    # -- on join ----------------------------------------------------------------------------------

    async def choose_span(self) -> Span:
        """``--stage`` if pinned (checked against the run and this peer's memory), else placement's
        choice on the current records."""
        manifest, host, pinned = self.manifest, self.host, self.settings.peer.stage
        if pinned is not None:
            span = Span.parse(pinned)
            if span.end >= manifest.num_stages:
                raise ConfigError(f"--stage {pinned}: stage {span.end} does not exist, the run has "
                                  f"{manifest.num_stages} stages (0 to {manifest.num_stages - 1})")
            needed = sum(host.stage_bytes[stage] for stage in span.stages)
            if needed > host.memory:
                raise InsufficientMemory(f"--stage {pinned} needs {needed / 2**30:.2f} GiB (parameters, gradients "
                                         f"and AdamW state) but this peer has {host.memory / 2**30:.2f} GiB free")
            self.claim_reason = "pinned with --stage"
            return span
        records = await self.dht.all_records(manifest.num_stages)
        loads, replicas = loads_without(manifest.num_stages, records, {host.peer_id})
        served = {r.stage for rs in records.values() for r in rs if r.state == PeerState.ONLINE}
        self.found_empty = len(served) < manifest.num_stages  # claims (``loading``) are no service yet
        m = self.measurement
        span = choose_stages(loads, host.stage_bytes, compute=m.compute, network=m.network,
                             memory_bytes=host.memory, max_stages=self.settings.peer.max_stages, rng=random.Random(),
                             replicas=replicas, cost=self._cost)
        self.claim_reason = explain_placement(loads, span.start, m.per_stage(span.count), count=span.count)
        return span

    async def settle_claim(self, span: Span, rounds: int = 3) -> Span:
        """Claim, then verify (when this peer found a stage nobody serves: a new run, or a hole that
        several peers may rush to): wait ``peer.claim_settle`` s for the claims of peers joining at the same
        moment, then take this peer's span in ``plan_joiners`` of that group (every member computes the
        same plan from the same records, so they split the stages instead of each claiming the whole
        model). A changed claim is announced and verified again (bounded)."""
        settle, host = self.settings.peer.claim_settle, self.host
        for _ in range(rounds if settle > 0 else 0):
            await asyncio.sleep(settle)
            records = await self.dht.all_records(self.manifest.num_stages)
            m = self.measurement
            me = Joiner(host.peer_id, m.compute or m.throughput, host.memory, m.network or float("inf"))
            group = joiners_in(records, me, now=get_dht_time(), settled_after=2 * settle)
            if len(group) < 2:
                return span
            loads, replicas = loads_without(self.manifest.num_stages, records, {j.peer_id for j in group})
            planned = plan_joiners(loads, replicas, group, host.stage_bytes, cost=self._cost,
                                   max_stages=self.settings.peer.max_stages).get(host.peer_id, span)
            if planned == span:
                logger.info("%d peers are joining together; this one keeps %s", len(group), span)
                return span
            logger.info("%d peers are joining together: this one takes %s instead of %s", len(group), planned, span)
            self.claim_reason = f"split with {len(group) - 1} peer(s) joining at the same time"
            await host.claim_stages(planned)
            span = planned
        return span

    # -- while serving ----------------------------------------------------------------------------

    def start(self, tasks: TaskSet) -> None:
        """Re-evaluate this peer's stage every ``rebalance_period``, as a task of ``tasks``. Idempotent."""
        if not self._started:
            self._started = True
            tasks.spawn(self._rebalance_forever(), name="peer-rebalance")

    async def _rebalance_forever(self) -> None:
        """Every ``watch_period`` s a quick look: a move that fills an empty stage or drops part of this
        peer's own span (nothing to load) is made at once; any other move is considered once per
        ``rebalance_period`` (randomised), the peer that gains most going first."""
        peer, rng = self.settings.peer, random.Random()
        next_full = time.monotonic() + peer.rebalance_period * rng.uniform(0.5, 1.5)
        while True:
            await asyncio.sleep(peer.watch_period * rng.uniform(0.8, 1.2))
            try:
                move = await self.consider_move()
                if move is None:
                    continue
                if _urgent(move):  # others may have seen the same: a random pause, then the claim decides
                    await asyncio.sleep(peer.watch_period * rng.random())
                elif time.monotonic() < next_full:
                    continue
                else:
                    next_full = time.monotonic() + peer.rebalance_period * rng.uniform(0.5, 1.5)
                    await asyncio.sleep(peer.rebalance_period * 0.5 * rng.random() / (1 + min(move.gain, 3.0)))
                move = await self.consider_move()
                if move is not None and await self._claim(move, settle=min(2.0, peer.rebalance_period / 4)):
                    await self.move_to(move)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a failed check or move must not stop serving; the next look retries
                logger.warning("rebalancing failed: %s: %s", type(e).__name__, e)

    async def _claim(self, move: Move, *, settle: float) -> bool:
        """Announce the move (``loading`` on the stages it adds, ``draining`` on the ones it drops), give
        other claims ``settle`` seconds to show, and keep the claim only if the move still holds with
        every other claim counted. Two peers that claimed the same hole, or that both drop the same
        stage, at the same moment both back off (and draw new random times): a claim that survives
        this check is the only one."""
        host = self.host
        await self._announce_claim(move)
        await host.announce_draining([stage for stage in host.slots if stage not in move.new.stages])
        await asyncio.sleep(settle)
        again = await self.consider_move()
        if again is not None and again.new == move.new:
            return True
        logger.info("another peer claimed the same change first; staying on %s", host.span)
        await self._withdraw_claim()
        return False

    async def _announce_claim(self, move: Move) -> None:
        added = [s for s in move.new.stages if s not in self.host.slots]
        self.host.pending = [r for r in self.host.span_records(move.new, PeerState.LOADING) if r.stage in added]
        for record in self.host.pending:
            await self.dht.announce(record)

    async def _withdraw_claim(self) -> None:
        pending, self.host.pending = self.host.pending, []
        for record in pending:
            await self.dht.withdraw(record)
        await self.host.announce_online()

    async def consider_move(self) -> Move | None:
        """``should_move`` on the current DHT records (with each stage's replicas and what they cost in
        averaging), this peer counted as it serves now."""
        manifest, host, m = self.manifest, self.host, self.measurement
        records = await self.dht.all_records(manifest.num_stages)
        await self._probe_lone_replicas(records)
        loads, replicas = loads_without(manifest.num_stages, records, {host.peer_id} | self.gone())
        for stage, slot in [*host.slots.items(), *host.hosted.items()]:
            loads[stage] += slot.record.throughput
            replicas[stage] += 1
        peer, cost = self.settings.peer, self._cost
        self._rebalancing = rebalancing_needed(effective_loads(loads, replicas, cost), peer.rebalance_margin,
                                               self._rebalancing)
        me = PlacedPeer(host.peer_id, m.compute, host.span, m.network)
        move = should_move(loads, host.stage_bytes, me, memory_bytes=host.memory, margin=peer.rebalance_margin,
                           active=self._rebalancing, max_stages=peer.max_stages, replicas=replicas, cost=cost)
        if move is not None and set(move.new.stages) & set(host.hosted):
            return None  # one slot per stage on a peer: a stage hosted for a delegator stays with it
        return move

    async def _probe_lone_replicas(self, records: Mapping[int, Sequence[PeerRecord]]) -> None:
        """Ask the only other replica of each stage this peer does not serve whether it is there
        (``info``, 2 s). A peer killed outright leaves its records in the DHT until they expire (up to
        ``RECORD_TTL``); one that did not answer twice in a row counts as gone, so its stage shows as
        empty and is refilled now rather than a minute later."""
        client = StageClient(self.host.replica_transport(), attempts=1)
        for stage, stage_records in records.items():
            online = {r.peer_id for r in stage_records
                      if r.state == PeerState.ONLINE and r.peer_id != self.host.peer_id}
            if stage in self.host.slots or len(online) != 1:
                continue
            (peer,) = online
            try:
                await asyncio.wait_for(client.info(peer, stage), 2.0)
                self.unanswered.pop(peer, None)
            except (SwarmError, asyncio.TimeoutError) as e:
                self.unanswered[peer] += 1
                logger.info("stage %d's only replica %s did not answer (%d time(s)): %s", stage, peer[-8:],
                            self.unanswered[peer], e)

    async def move_to(self, move: Move) -> None:
        """Leave the old span for ``move.new``. Stages in both spans stay as they are: their module,
        optimizer state and step are kept in memory and serve on. Stages only in the new span are
        claimed (``loading``) and loaded, each from a live replica. Stages only in the old span are
        announced ``draining``, served until trainers have moved on, then withdrawn; a stage no other
        online replica serves is never dropped (the move is called off instead). Moves run one at a
        time (the rebalancing loop's and one asked for from outside may overlap)."""
        async with self._moving:
            if self.host.span == move.new:
                return
            await self._move(move)

    async def _move(self, move: Move) -> None:
        host, old = self.host, self.host.span
        added = [s for s in move.new.stages if s not in host.slots]
        dropped = [s for s in host.slots if s not in move.new.stages]
        logger.info("moving from %s to %s: bottleneck %.0f -> %.0f tokens/s (keeping %s)", old, move.new,
                    move.bottleneck_before, move.bottleneck_after,
                    ", ".join(str(s) for s in host.slots if s in move.new.stages) or "nothing")
        if sorted(r.stage for r in host.pending) != added:
            await self._announce_claim(move)
        await host.announce_draining(dropped)
        await self._drain(dropped)
        alone = [stage for stage in dropped if not await host.online_replicas(stage, reads=2)]
        if alone:
            logger.warning("not moving to %s: no other online peer serves stage(s) %s", move.new,
                           ", ".join(map(str, alone)))
            await self._withdraw_claim()
            return
        await host.change_span(move.new, added)
        self._on_moved(added)
        self.claim_reason = (f"moved from {old}: bottleneck {move.bottleneck_before:.0f} -> "
                             f"{move.bottleneck_after:.0f} tokens/s")
        await host.announce_online()
        self.moves.append(move)
        logger.info("now serving %s (layers %s)", move.new, span_layers(self.manifest, move.new))

    async def _drain(self, stages: Collection[int]) -> None:
        """Serve the ``stages`` being left for ``drain_seconds`` (trainers refresh their routes and stop
        sending), then until none of their requests is in flight and a second passed without one; at
        most 30 s more. Nothing to wait for when no stage is left."""
        if not stages:
            return
        await asyncio.sleep(self.settings.peer.drain_seconds)
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if self.router.in_flight(stages) == 0 and self.router.idle_seconds(stages) >= 1.0:
                return
            await asyncio.sleep(0.1)
        logger.warning("stage(s) %s still had requests in flight after draining; leaving anyway",
                       ", ".join(map(str, stages)))


def _urgent(move: Move) -> bool:
    """A move made at once, not once per rebalancing period: it fills a stage nobody serves, or it only
    drops stages of the peer's own span (nothing to load, the rest kept)."""
    shrink = move.old.start <= move.new.start and move.new.end <= move.old.end
    return move.bottleneck_before <= 0 or shrink
