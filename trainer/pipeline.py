"""The trainer's side of the data plane: batches through the route, forward and backward, and the
collaborative step that closes them, surviving peers that die, hang or err mid-step.

Two ways through the stages:

* relayed: the trainer calls stage 0, then stage 1 with stage 0's output, and so on, and in reverse
  for gradients. A ``Trace`` remembers, per stage, the peer and the inputs of each forward so the
  backward can go to the same peer (which still holds the graph) or, after a ``CacheMiss`` or a
  failover, to another replica with the inputs resent.
* pushed (``push=True``, training only): the trainer sends a microbatch to stage 0's peer with its
  route, each peer sends its output straight to the next (``peers.training.push``) and the trainer collects
  the last one's; gradients go the same way in reverse. The trainer then holds only the ends of each
  microbatch (its input, the gradient of its output, and every hop's request id and dropout seed),
  which is enough to rebuild any hop exactly: a push that breaks, and every backward a dropped peer
  held, are redone through the relayed path (``_rebuild``: the forward recomputed without keeping
  graphs, then the backward through every later stage without counting it again, and through the
  stages that lost it counted).

Fault tolerance: every backward a replica accumulates in the open step is kept in a ledger (its
inputs and gradient) until the step is applied. When a call fails, ``swarm.errors.recovery_for``
decides: abort (a malformed request), or route around the peer: it is banned for ``ban_time`` and
everything it had accumulated in this step is replayed on another replica of its stage, so no
microbatch is lost; a banned peer is never a member of the step, so nothing it held is applied
twice. The only replica of a stage is retried a few times first (a lost reply is far likelier than a
dead peer); after that the trainer waits, bounded and saying so, for a peer to take the stage over.
A dropped peer comes back into routes only once it answers (``info``) after its ban: a dead peer's
record stays in the DHT up to ``RECORD_TTL`` after its last refresh, which may outlast the ban, and
dialing it again spent the calls of the very microbatch that waited for its stage (issue 21).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Collection, Iterable, Mapping, Sequence, TypeVar

import torch
from hivemind.utils import get_dht_time

from dht.schemas import RECORD_TTL, Manifest, PeerRecord, PeerState
from peers.training.client import StageClient, StageInputs
from peers.training.protocol import HopDone, PushHop, StepResponse
from peers.training.routing import Hop, plan_route
from peers.training.sanity import MAX_ABS
from shards.schedule import Action, Phase, actions_of_stage, dependency, gpipe_schedule
from core.errors import (
    AveragingFailed,
    InvalidOutput,
    NoRoute,
    PeerUnavailable,
    Recovery,
    StageTimeout,
    StaleReplica,
    SwarmError,
    recovery_for,
)
from trainer.spotcheck import SpotChecker
from trainer.steps import LocalCoordinator, StepCoordinator, StepStatus, wait_until_closed

__all__ = ["RemotePipeline", "Trace", "RecordSource", "FaultPolicy"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_EARLY_PROBE = 5.0  # seconds between probes of a banned replica whose stage nobody else serves
_STALE_RECHECK = 2.0  # seconds before a replica left out for being behind is asked its step again

RecordSource = Callable[[], Awaitable[Mapping[int, Sequence[PeerRecord]]]]
"""Returns the current peer records per stage (the DHT in real use, a dict in unit tests)."""


@dataclass(frozen=True)
class FaultPolicy:
    """How hard the trainer tries before it gives up on a call (all bounded)."""

    attempts: int = 6  # calls of one stage for one request, over all replicas
    lone_retries: int = 2  # retries of a stage's only replica before it is presumed dead
    backoff: float = 0.25  # seconds before retrying the only replica of a stage (doubles each time)
    ban_time: float = 60.0  # seconds a failed peer is left out of routes and steps; then it must answer a probe
    probe_timeout: float = 5.0  # seconds a dropped peer whose ban ended has to answer ``info`` to come back
    step_attempts: int = 4  # rounds of applying one collaborative step
    averaging_window: float = 0.5  # seconds from a step's request to the replicas' averaging round
    step_wait: float = 60.0  # seconds to wait for other trainers to finish a step
    spot_check_rate: float = 0.02  # training forwards recomputed on another replica (trainer.spotcheck)
    spot_check_tolerance: float | None = None  # None: by dtype (trainer.spotcheck.TOLERANCE)
    max_abs: float = MAX_ABS  # a stage output or gradient beyond this (or NaN/inf) is InvalidOutput


@dataclass
class _HopTrace:
    hop: Hop
    request_id: str
    inputs: StageInputs | None  # None: pushed there peer to peer (``RemotePipeline._rebuild`` recomputes it)
    seed: int


@dataclass
class Trace:
    """What a training forward left behind for its backward."""

    hops: list[_HopTrace] = field(default_factory=list)
    num_samples: int = 0
    grad: torch.Tensor | None = None  # of the last stage's output, once the backward has started

    @property
    def pushed(self) -> bool:
        """Some hop's input went peer to peer: the trainer does not hold it."""
        return any(hop.inputs is None for hop in self.hops)


@dataclass
class _Contribution:
    """A backward that a replica has accumulated in the open step: enough to replay it elsewhere
    (``grad_output`` None: a pushed one, rebuilt from its ``trace``)."""

    hop: _HopTrace
    grad_output: torch.Tensor | None
    num_samples: int
    trace: Trace | None = None


class _PushBroken(Exception):
    """A push did not bring its result back. ``done``: the hops it computed (None: not known, the
    reply was lost); ``blame``: a peer that returned an invalid result, if that was the cause."""

    def __init__(self, why: str, done: list[HopDone] | None, blame: str | None = None):
        super().__init__(why)
        self.done, self.blame = done, blame


class RemotePipeline:
    """Runs microbatches through the stages of a run, with routes refreshed from ``records``."""

    def __init__(
        self,
        manifest: Manifest,
        client: StageClient,
        records: RecordSource,
        *,
        coordinator: StepCoordinator | None = None,
        policy: FaultPolicy = FaultPolicy(),
        route_ttl: float = 10.0,
        route_wait: float = 120.0,
        seed: int | None = None,
        spot_check: SpotChecker | None = None,
        depth: int = 2,
        push: bool = False,
    ):
        """``spot_check`` (default: one at ``policy.spot_check_rate`` that reports to nobody) recomputes
        some forwards on another replica; a replica caught is banned like a failed one. ``depth``:
        calls in flight per peer of a stage while a batch's microbatches are pipelined (pushed:
        microbatches in flight per stage). ``push``: training microbatches go peer to peer (see the
        module doc)."""
        self.manifest = manifest
        self.push = push
        self.push_fallbacks = 0  # pushes that broke and were rebuilt through the trainer
        # wall seconds spent reading the DHT's records, applying steps (the replicas' averaging) and
        # committing them (everything else of ``commit``), for benchmarks/train_throughput.py
        self.timings: Counter[str] = Counter()
        self.client = client
        self.coordinator = coordinator or LocalCoordinator(manifest.target_batch_size)
        self.policy = policy
        self.depth = depth
        self.step: int | None = None  # the run's collaborative step, learned from the replicas
        self.last_closed: StepStatus | None = None  # the step the last backward pass closed, if any
        self._alone = False  # the last read of the trainers' records saw no other trainer
        self._announcing: asyncio.Task | None = None  # a lone trainer's commit, published after the step
        self._replies: set[asyncio.Future] = set()  # replies of pushes already collected (``_pushed``)
        self._step_records: asyncio.Future | None = None  # the replicas' records, read during the closing backward
        self.failovers = 0  # calls routed around a failed peer (for logs and benchmarks)
        self.penalties: Counter[str] = Counter()  # invalid outputs per peer (each also banned it)
        self._records_source = records
        self._records: Mapping[int, Sequence[PeerRecord]] = {}
        self._records_time = float("-inf")
        self._route_ttl, self._route_wait = route_ttl, route_wait
        self._rng = random.Random(seed)
        self._banned: dict[str, float] = {}  # peer -> when its ban ends
        self._dropped: dict[str, BaseException] = {}  # banned peers -> why, until one answers a probe after its ban
        self._probed: dict[str, tuple[float, float]] = {}  # dropped peer -> (last early probe, seconds to the next)
        self._queue: Counter[str] = Counter()  # microbatches routed to each peer since the records were read
        self._overhead_ms: dict[str, float] = {}  # observed round trip beyond compute, per peer
        self._peer_steps: dict[str, int] = {}
        self._seen: dict[tuple[str, int], tuple[float, PeerRecord]] = {}  # (peer id, stage) -> (when, its last record)
        self._ledger: dict[int, dict[str, list[_Contribution]]] = defaultdict(lambda: defaultdict(list))
        self._step_samples = 0
        self.spot_check = spot_check or SpotChecker(client, rate=policy.spot_check_rate,
                                                    tolerance=policy.spot_check_tolerance, rng=random.Random(seed))

    @property
    def records(self) -> RecordSource:
        """Where routes come from (the DHT); inference sessions plan their own routes from it."""
        return self._records_source

    # -- routes --------------------------------------------------------------------------------

    async def _current_records(self, *, fresh: bool = False) -> Mapping[int, Sequence[PeerRecord]]:
        if fresh or time.monotonic() - self._records_time >= self._route_ttl:
            started = time.perf_counter()
            self._records = self._with_recently_seen(await self._records_source())
            self.timings["dht"] += time.perf_counter() - started
            self._records_time = time.monotonic()
            self._queue.clear()  # microbatches spread over replicas afresh with each new view
        return self._records

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
        answered a probe since (``_readmit``) while a record of theirs is still in view."""
        now = time.monotonic()
        self._banned = {peer: until for peer, until in self._banned.items() if until > now}
        in_view = self._in_view()
        self._dropped = {peer: why for peer, why in self._dropped.items() if peer in self._banned or peer in in_view}
        self._probed = {peer: when for peer, when in self._probed.items() if peer in self._dropped}
        return set(self._banned) | set(self._dropped)

    def _in_view(self) -> set[str]:
        return {r.peer_id for rs in self._records.values() for r in rs}

    def _ban(self, peer_id: str, why: BaseException) -> None:
        """Leave ``peer_id`` out of routes and steps for ``ban_time``, then until it answers a probe. A
        replica left out only for being behind (``StaleReplica``) is probed again after ``_STALE_RECHECK``
        s instead, and is back as soon as it answers at the run's step: it takes the current state by
        itself within seconds (``peers.state.resync``), and left out for a minute it fell behind again at every
        step it missed (a churn run lost 6 steps when the other replica of its stage died meanwhile)."""
        ban = _STALE_RECHECK if isinstance(why, StaleReplica) else self.policy.ban_time
        logger.warning("leaving peer %s out for %.0f s, and until it answers: %s: %s", peer_id[-8:], ban,
                       type(why).__name__, why)
        self._banned[peer_id] = time.monotonic() + ban
        self._dropped[peer_id] = why

    async def _readmit(self, unserved: Collection[int] = ()) -> None:
        """Probe (``info``, bounded by ``policy.probe_timeout``) the dropped peers whose ban has ended
        and whose record is still in view: one that answers is back in routes, one that does not is
        banned again. A dead peer's record outlives it in the DHT (up to ``RECORD_TTL`` after its last
        refresh): without this, a ban shorter than that sent real work to it again, and the calls it
        failed counted against the microbatch that was waiting for its stage to be taken over.

        A banned replica of a stage in ``unserved`` (nobody else serves it) is probed before its ban
        ends (``_EARLY_PROBE`` s apart, doubling while it does not answer), unless a spot check or a
        sanity check caught it: with no other replica to route to, the ban protects nothing, and
        waiting it out cost 42 s of training in a churn run (the last live replica of stage 0 had been
        banned for a failed averaging round). Behind, it adopts the run's step as a lone replica does."""
        now = time.monotonic()
        self.banned()
        urgent = {r.peer_id for stage in unserved for r in self._records.get(stage, ())
                  if r.state == PeerState.ONLINE and r.layers == self.manifest.stages[stage]}
        early = sorted(peer for peer, why in self._dropped.items()
                       if peer in urgent and self._banned.get(peer, now) > now and not isinstance(why, InvalidOutput)
                       and now - sum(self._probed.get(peer, (float("-inf"), 0.0))) >= 0)
        due = sorted(set(early) | {peer for peer in self._dropped if self._banned.get(peer, now) <= now})
        if not due:
            return
        for peer in early:
            logger.warning("peer %s is the only replica left of its stage: asking whether it answers before its "
                           "ban ends", peer[-8:])
            self._probed[peer] = (now, 2 * self._probed[peer][1] if peer in self._probed else _EARLY_PROBE)
        for peer in due:  # being probed: another route planned meanwhile neither probes nor uses it
            self._banned[peer] = now + self.policy.probe_timeout
        stage_of = {r.peer_id: r.stage for rs in self._records.values() for r in rs}
        answers = await asyncio.gather(*(asyncio.wait_for(self.client.info(peer, stage_of.get(peer)),
                                                          self.policy.probe_timeout) for peer in due),
                                       return_exceptions=True)
        for peer, answer in zip(due, answers):
            if isinstance(answer, BaseException):
                self._banned[peer] = time.monotonic() + self.policy.ban_time
                logger.warning("peer %s still does not answer (%s); its record is still in the DHT: left out "
                               "another %.0f s", peer[-8:], type(answer).__name__, self.policy.ban_time)
            elif isinstance(self._dropped.get(peer), StaleReplica) and self.step is not None \
                    and answer.optimizer_step < self.step:
                self._banned[peer] = time.monotonic() + _STALE_RECHECK  # still catching up
            else:
                self._banned.pop(peer, None)
                self._dropped.pop(peer, None)
                self._probed.pop(peer, None)
                self._peer_steps[peer] = answer.optimizer_step
                logger.info("peer %s answers again (at step %d): back in routes", peer[-8:], answer.optimizer_step)

    async def route(self, tokens: int = 1) -> tuple[Hop, ...]:
        """A peer for every stage by expected time (throughput, microbatches already sent there since
        the records were read, the round trip observed beyond compute), waiting (bounded, and saying
        so) for stages nobody serves."""
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            records = await self._current_records(fresh=attempt > 1)  # waiting: the DHT read afresh each time
            await self._readmit(self._unserved(records) if attempt > 1 else ())
            try:
                route = plan_route(self.manifest.stages, records, banned=self.banned(), rng=self._rng, tokens=tokens,
                                   queue=self._queue, latency_ms=self._overhead_ms)
            except NoRoute as e:
                waited = time.monotonic() - started
                if waited > self._route_wait:
                    raise NoRoute(f"{e} (waited {self._route_wait:.0f} s; {self._left_out()})") from None
                if attempt == 1 or attempt % 10 == 0:
                    logger.warning("waiting for a peer to take over: %s; %s (attempt %d, %.0f of %.0f s)", e,
                                   self._left_out(), attempt, waited, self._route_wait)
                await asyncio.sleep(min(0.25 * attempt, 2.0))
                continue
            if attempt > 1:
                logger.warning("every stage is served again after %.1f s (attempt %d): %s",
                               time.monotonic() - started, attempt,
                               ", ".join(f"stage {hop.stage} by {hop.peer_id[-8:]}" for hop in route))
            return route

    def _unserved(self, records: Mapping[int, Sequence[PeerRecord]]) -> list[int]:
        """The stages no online, unbanned peer serves in ``records``."""
        banned = self.banned()
        return [stage for stage, layers in enumerate(self.manifest.stages)
                if not any(r.state == PeerState.ONLINE and r.layers == layers and r.peer_id not in banned
                           for r in records.get(stage, ()))]

    def _left_out(self) -> str:
        """The dropped peers and why, for the logs of a trainer waiting for a stage."""
        banned = self.banned()
        if not banned:
            return "no peer is left out"
        why = {peer: f"{type(e).__name__}: {e}" for peer, e in self._dropped.items()}
        return "left out: " + "; ".join(f"{peer[-8:]} ({why.get(peer, 'banned')})" for peer in sorted(banned))

    def _observe(self, peer_id: str, seconds: float, tokens: int) -> None:
        """Remember how much longer than its compute a call to ``peer_id`` took (network, queues): a
        moving average in ms that routing adds to the peer's expected time."""
        throughput = next((r.throughput for found in self._records.values() for r in found
                           if r.peer_id == peer_id), 0.0)
        compute = tokens / throughput if throughput > 0 else 0.0
        overhead_ms = max(seconds - compute, 0.0) * 1000
        previous = self._overhead_ms.get(peer_id)
        self._overhead_ms[peer_id] = overhead_ms if previous is None else 0.7 * previous + 0.3 * overhead_ms

    async def _pick(self, stage: int) -> str:
        return (await self.route())[stage].peer_id

    def _replicas(self, stage: int) -> list[str]:
        layers = self.manifest.stages[stage]
        banned = self.banned()
        return [r.peer_id for r in self._records.get(stage, ())
                if r.state == PeerState.ONLINE and r.layers == layers and r.peer_id not in banned]

    # -- calls with failover ---------------------------------------------------------------------

    async def _on_replica(self, stage: int, call: Callable[[str], Awaitable[T]], prefer: str | None = None) -> tuple[T, str]:
        """Run ``call(peer)`` on a replica of ``stage``, routing around peers that fail (see module doc).

        A peer that did not answer is tried once more (a reply lost on the way is the common case, and
        every stage call is idempotent), the only replica of a stage a few times with backoff; a peer
        that hung past the timeout, or fails again, is dropped and the call goes to another replica."""
        peer = prefer if prefer is not None and prefer not in self.banned() else await self._pick(stage)
        same_peer_tries = 0
        for attempt in range(1, self.policy.attempts + 1):
            if attempt > 1 and peer in self.banned():  # another call in flight found it failing and dropped it
                peer, same_peer_tries = await self._pick(stage), 0
                logger.warning("stage %d: going on with peer %s (attempt %d/%d)", stage, peer[-8:], attempt,
                               self.policy.attempts)
            try:
                return await call(peer), peer
            except SwarmError as e:
                if recovery_for(e) is Recovery.ABORT or attempt == self.policy.attempts:
                    raise
                alone = not [p for p in self._replicas(stage) if p != peer]
                if isinstance(e, InvalidOutput):  # it would compute the same again: never retried
                    self.penalties[peer] += 1
                    retries = 0
                else:
                    retries = self.policy.lone_retries if alone else int(not isinstance(e, (StageTimeout, StaleReplica)))
                if peer in self.banned():  # another call found it failing meanwhile and dropped it
                    continue
                if same_peer_tries < retries:
                    same_peer_tries += 1
                    logger.warning("stage %d: peer %s failed (attempt %d/%d): %s; trying it again", stage, peer[-8:],
                                   attempt, self.policy.attempts, e)
                    if alone:  # another replica waits otherwise: a lost reply is retried at once
                        await asyncio.sleep(self.policy.backoff * 2 ** (same_peer_tries - 1))
                    continue
                self.failovers += 1
                await self._drop(peer, e)
                peer, same_peer_tries = await self._pick(stage), 0
                logger.warning("stage %d: going on with peer %s (attempt %d/%d)", stage, peer[-8:], attempt + 1,
                               self.policy.attempts)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _drop(self, peer_id: str, why: BaseException) -> None:
        """Ban ``peer_id`` and replay on other replicas every backward it holds in the open step."""
        self._ban(peer_id, why)
        for stage, by_peer in list(self._ledger.items()):
            lost = by_peer.pop(peer_id, [])
            for contribution in lost:
                if contribution.grad_output is None:  # pushed: this trainer never held its input nor gradient
                    await self._replay_pushed(stage, contribution)
                else:
                    await self._backward_hop(stage, contribution.hop, contribution.grad_output,
                                             contribution.num_samples)
            if lost:
                logger.info("stage %d: replayed %d backward(s) that peer %s held", stage, len(lost), peer_id[-8:])

    async def _backward_hop(self, stage: int, hop: _HopTrace, grad_output: torch.Tensor, num_samples: int, *,
                            accumulate: bool = True) -> torch.Tensor:
        """``accumulate=False``: only the input gradient, nothing counted on the stage nor in the ledger."""
        layers = self.manifest.stages[stage]

        async def call(peer: str):
            return await self.client.backward(peer, stage, layers, hop.request_id, grad_output, hop.inputs,
                                              num_samples=num_samples, seed=hop.seed, accumulate=accumulate)

        async def checked(peer: str):
            result = await call(peer)
            if accumulate:  # a rebuild's other hops may run while the step is being applied: no news of the run
                self._saw_step(stage, peer, result[1].optimizer_step)
            return result

        (grad_input, _), peer = await self._on_replica(stage, checked, prefer=hop.hop.peer_id)
        if not accumulate:
            return grad_input
        if peer in self.banned():  # dropped while this call was in flight: its replay did not see this one
            return await self._backward_hop(stage, hop, grad_output, num_samples)
        self._ledger[stage][peer].append(_Contribution(hop, grad_output, num_samples))
        return grad_input

    def _saw_step(self, stage: int, peer_id: str, step: int) -> None:
        """Note a replica's optimizer step. One ahead of us means another trainer closed the step:
        what we gave it was applied there, so our ledger of it is done. One behind the others
        missed a step: it must not compute for us (``StaleReplica``) unless it is all the stage has."""
        self._peer_steps[peer_id] = step
        if self.step is None or step > self.step:
            if self.step is not None:
                logger.info("the run moved on to step %d (another trainer closed step %d)", step, self.step)
                self._ledger.clear()
                self._step_samples = 0
            self.step = step
        elif step < self.step and [p for p in self._replicas(stage) if p != peer_id]:
            raise StaleReplica(f"peer {peer_id[-8:]} of stage {stage} is at step {step}, the run at {self.step}")

    # -- forward and backward ---------------------------------------------------------------------

    async def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None, *, train: bool
    ) -> tuple[torch.Tensor, Trace]:
        """One microbatch through every stage (see ``forward_microbatches``)."""
        return (await self.forward_microbatches([(hidden, mask, positions)], train=train))[0]

    async def _spot_check(self, hop: Hop, peer: str, inputs: StageInputs, seed: int,
                          output: torch.Tensor) -> tuple[torch.Tensor, str]:
        """Recompute ``peer``'s output on another replica; a replica caught lying is dropped like a
        failed one (banned, its backwards of the open step replayed elsewhere) and the microbatch goes
        on with the honest output (from the replica that computed it: the backward follows it there)."""
        verdict = await self.spot_check.check(hop.stage, hop.layers, peer, self._replicas(hop.stage), inputs, seed,
                                              output, self._peer_steps.get(peer, 0))
        for liar in verdict.caught:
            self.penalties[liar] += 1
            await self._drop(liar, InvalidOutput(verdict.reason))
        return verdict.output, verdict.peer

    def tainted(self, traces: Sequence[Trace]) -> list[int]:
        """The indices of ``traces`` whose forward went through a peer that a spot check has caught
        since: their outputs are suspect. Nothing of them is accumulated before their backward, so
        running their forwards again (``recompute``) leaves the step as if the liar had not been there."""
        liars = {peer for peer, _ in self.spot_check.caught}
        return [i for i, trace in enumerate(traces) if any(h.hop.peer_id in liars for h in trace.hops)]

    async def backward(self, trace: Trace, grad_output: torch.Tensor) -> torch.Tensor:
        """One microbatch's gradient back through every stage (see ``backward_microbatches``)."""
        return (await self.backward_microbatches([trace], [grad_output]))[0]

    async def forward_microbatches(self, parts: Sequence[StageInputs], *, train: bool) -> list[tuple[torch.Tensor, Trace]]:
        """Every microbatch through every stage, pipelined (``shards.schedule``): while stage 1
        computes microbatch 0, stage 0 computes microbatch 1. Each microbatch's route is planned
        before any is sent, each counting those planned before it, so replicas share the work."""
        routes = await self._plan_routes(parts)
        if train and self.push:
            return await self._each(len(parts), lambda m: self._push_forward(parts[m], routes[m]))
        traces = [Trace(num_samples=hidden.shape[0]) for hidden, _, _ in parts]
        hops: list[dict[int, _HopTrace]] = [{} for _ in parts]

        async def run(action: Action, hidden: torch.Tensor) -> torch.Tensor:
            _, mask, positions = parts[action.microbatch]
            hidden, hop = await self._forward_hop(routes[action.microbatch][action.stage], (hidden, mask, positions),
                                                  train=train)
            hops[action.microbatch][action.stage] = hop
            return hidden

        schedule = gpipe_schedule(len(parts), self.manifest.num_stages, phase=Phase.FORWARD)
        done = await self._run_schedule(schedule, run, [hidden for hidden, _, _ in parts], routes)
        last = self.manifest.num_stages - 1
        if train:
            for trace, by_stage in zip(traces, hops):
                trace.hops = [by_stage[stage] for stage in range(last + 1)]
        return [(done[(m, last)], trace) for m, trace in enumerate(traces)]

    async def backward_microbatches(self, traces: Sequence[Trace], grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients of ``forward_microbatches``' outputs back through the stages, pipelined in
        reverse; returns the gradient of each microbatch's input. Pushed forwards go back pushed.
        When these samples will close the step, the replicas' records for it are read meanwhile."""
        self._read_records_if_closing(sum(trace.num_samples for trace in traces))
        if any(trace.pushed for trace in traces):
            return await self._each(len(traces), lambda m: self._push_backward(traces[m], grads[m]))

        async def run(action: Action, grad: torch.Tensor) -> torch.Tensor:
            trace = traces[action.microbatch]
            return await self._backward_hop(action.stage, trace.hops[action.stage], grad, trace.num_samples)

        schedule = gpipe_schedule(len(traces), self.manifest.num_stages, phase=Phase.BACKWARD)
        routes = [tuple(hop.hop for hop in trace.hops) for trace in traces]
        done = await self._run_schedule(schedule, run, list(grads), routes)
        return [done[(m, 0)] for m in range(len(traces))]

    async def train_microbatches(self, parts: Sequence[StageInputs],
                                 loss: Callable[[int, torch.Tensor], Awaitable[torch.Tensor]]) -> list[torch.Tensor]:
        """Forward and backward of every training microbatch, pushed (``push`` only), each one's
        backward started as soon as ``loss(m, output)`` has turned its output into that output's
        gradient, while later microbatches are still going forward: the trainer's loss, a barrier
        between the two phases of ``forward_microbatches`` and ``backward_microbatches``, is per
        microbatch here, so the stages do not drain between the phases and the links' latency of one
        microbatch's turn overlaps the others' compute. Returns each microbatch's input gradient.

        Spot checks are drawn for every microbatch first, and no backward starts until the drawn ones
        are done: a liar they catch has then had no backward counted anywhere, and the microbatches
        it touched are redone (as ``tainted`` lets the two-phase path redo them)."""
        if not self.push:
            raise ValueError("train_microbatches overlaps pushed microbatches; a relaying pipeline runs "
                             "forward_microbatches, then backward_microbatches")
        routes = await self._plan_routes(parts)
        checks = [[self.spot_check.wants() for _ in route] for route in routes]
        unchecked = sum(any(drawn) for drawn in checks)
        checked = asyncio.Event()
        if not unchecked:
            checked.set()
        samples = sum(hidden.shape[0] for hidden, _, _ in parts)
        slots = asyncio.Semaphore(self.depth * self.manifest.num_stages)

        async def one(m: int) -> torch.Tensor:
            nonlocal unchecked
            async with slots:
                output, trace = await self._push_forward(parts[m], routes[m], checks[m])
            if any(checks[m]):
                unchecked -= 1
                if not unchecked:
                    checked.set()
            await checked.wait()
            for _ in range(3):  # bounded, as in SwarmModelForCausalLM: a redo may meet another liar
                if not self.tainted([trace]):
                    break
                hidden = parts[m][0]
                route = await self.route(hidden.shape[0] * hidden.shape[1])
                async with slots:
                    output, trace = await self._push_forward(parts[m], route, [False] * len(route))
            grad = await loss(m, output)
            self._read_records_if_closing(samples)
            async with slots:
                return await self._push_backward(trace, grad)

        order = sorted(range(len(parts)), key=lambda m: not any(checks[m]))  # the checked ones first
        grads = dict(zip(order, await _all(one(m) for m in order)))
        return [grads[m] for m in range(len(parts))]

    async def _plan_routes(self, parts: Sequence[StageInputs]) -> list[tuple[Hop, ...]]:
        """Each microbatch's route, planned before any is sent, each counting those planned before it
        (so replicas share the work)."""
        routes = []
        for hidden, _, _ in parts:
            routes.append(await self.route(hidden.shape[0] * hidden.shape[1]))
            self._queue.update({hop.peer_id for hop in routes[-1]})  # the next microbatch weighs this one in
        return routes

    def _read_records_if_closing(self, samples: int) -> None:
        """When ``samples`` more will close the step, start reading the replicas' records for it now,
        while the closing backwards run (``commit`` uses them), unless that read is under way."""
        if self._step_samples + samples >= self.manifest.target_batch_size and self._step_records is None:
            self._step_records = asyncio.ensure_future(self._current_records(fresh=True))

    async def _forward_hop(self, hop: Hop, inputs: StageInputs, *, train: bool,
                           spot_check: bool | None = None) -> tuple[torch.Tensor, _HopTrace]:
        """One stage's forward with failover; ``spot_check`` (None: drawn at the policy's rate) compares
        a training forward with another replica's."""
        request_id = uuid.uuid4().hex
        seed = self._rng.randrange(2**31)
        tokens = inputs[0].shape[0] * inputs[0].shape[1]

        async def call(peer: str):
            started = time.perf_counter()
            result = await self.client.forward(peer, hop.stage, hop.layers, request_id, inputs, train=train, seed=seed)
            self._observe(peer, time.perf_counter() - started, tokens)
            self._saw_step(hop.stage, peer, result[1].optimizer_step)
            return result

        (hidden, _), peer = await self._on_replica(hop.stage, call, prefer=hop.peer_id)
        if train and (self.spot_check.wants() if spot_check is None else spot_check):
            hidden, peer = await self._spot_check(hop, peer, inputs, seed, hidden)
        return hidden, _HopTrace(Hop(hop.stage, hop.layers, peer), request_id, inputs, seed)

    # -- pushed: activations peer to peer ------------------------------------------------------------

    async def _each(self, count: int, run: Callable[[int], Awaitable[T]]) -> list[T]:
        """``run(m)`` for every microbatch, ``depth`` x stages of them in flight (each stage's peer
        queues its share, so stages compute different microbatches at once); the first failure
        cancels the rest and is raised as itself."""
        slots = asyncio.Semaphore(self.depth * self.manifest.num_stages)

        async def one(m: int) -> T:
            async with slots:
                return await run(m)

        return await _all(one(m) for m in range(count))

    async def _relay_forward(self, inputs: StageInputs, route: Sequence[Hop],
                             checks: Sequence[bool] | None = None) -> tuple[torch.Tensor, Trace]:
        """One training microbatch through every stage, relayed by the trainer."""
        hidden, mask, positions = inputs
        trace = Trace(num_samples=hidden.shape[0])
        for stage, hop in enumerate(route):
            hidden, done = await self._forward_hop(hop, (hidden, mask, positions), train=True,
                                                   spot_check=None if checks is None else checks[stage])
            trace.hops.append(done)
        return hidden, trace

    async def _push_forward(self, inputs: StageInputs, route: Sequence[Hop],
                            checks: Sequence[bool] | None = None) -> tuple[torch.Tensor, Trace]:
        """One training microbatch pushed along ``route``; relayed instead when a spot check is drawn
        for one of its hops (``checks``, default: drawn here; the check needs that hop's input) or
        when the push breaks."""
        checks = [self.spot_check.wants() for _ in route] if checks is None else checks
        if any(checks):
            return await self._relay_forward(inputs, route, checks)
        hidden, mask, positions = inputs
        hops = [_HopTrace(hop, uuid.uuid4().hex, inputs if hop.stage == 0 else None, self._rng.randrange(2**31))
                for hop in route]
        try:
            output, done = await self._pushed(hops, hidden, like=hidden, mask=mask, positions=positions)
            for hop in done:
                await self._saw_pushed(hop)
        except _PushBroken as e:
            await self._broken(e, "forward")
            return await self._relay_forward(inputs, route)
        return output, Trace(hops=hops, num_samples=hidden.shape[0])

    async def _push_backward(self, trace: Trace, grad_output: torch.Tensor) -> torch.Tensor:
        """The gradient of one microbatch's output pushed back along its forward's hops; the hops
        that did not count it (the push broke, or their peer was dropped meanwhile) are rebuilt."""
        trace.grad = grad_output
        if not trace.pushed:  # relayed forward (a spot check, or a push that broke)
            grad = grad_output
            for stage in reversed(range(len(trace.hops))):
                grad = await self._backward_hop(stage, trace.hops[stage], grad, trace.num_samples)
            return grad
        stages = set(range(len(trace.hops)))
        try:
            grad_input, done = await self._pushed(list(reversed(trace.hops)), grad_output,
                                                  like=trace.hops[0].inputs[0], num_samples=trace.num_samples,
                                                  backward=True)
        except _PushBroken as e:
            counted = await self._count_pushed(trace, e.done or [], blamed=e.blame)
            await self._broken(e, "backward")
            return await self._rebuild(trace, stages - counted, down_to=0)
        missing = stages - await self._count_pushed(trace, done)
        return grad_input if not missing else await self._rebuild(trace, missing, down_to=0)

    async def _pushed(self, hops: Sequence[_HopTrace], tensor: torch.Tensor, *, like: torch.Tensor,
                      mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                      num_samples: int = 1, backward: bool = False) -> tuple[torch.Tensor, list[HopDone]]:
        """Push ``tensor`` along ``hops`` and collect the last hop's result. A result collected with
        every hop reported done is returned at once: the push's reply, still coming back up the
        chain, would only repeat it. Otherwise the reply says where the chain broke. Raises
        ``_PushBroken`` if the result does not come back."""
        mailbox = uuid.uuid4().hex
        last = hops[-1].hop.peer_id
        timeout = self.client.timeout * len(hops)
        collecting = asyncio.ensure_future(self.client.collect(last, mailbox, like, timeout=timeout))
        pushing = asyncio.ensure_future(self.client.push(
            [PushHop(stage=h.hop.stage, layers=h.hop.layers, peer_id=h.hop.peer_id, request_id=h.request_id,
                     seed=h.seed) for h in hops],
            mailbox, tensor, mask=mask, positions=positions, num_samples=num_samples, backward=backward))
        try:
            await asyncio.wait((collecting, pushing), return_when=asyncio.FIRST_COMPLETED)
            if collecting.done() and not collecting.cancelled() and collecting.exception() is None:
                output, done = collecting.result()
                if [(d.stage, d.peer_id) for d in done] == [(h.hop.stage, h.hop.peer_id) for h in hops]:
                    self._let_reply_come(pushing)
                    return output, done
            try:
                response = await pushing
            except SwarmError as e:
                raise _PushBroken(f"the push to {hops[0].hop.peer_id[-8:]} failed: {type(e).__name__}: {e}", None)
            if response.failed is not None:
                failed = response.failed
                raise _PushBroken(f"stage {failed.stage}'s peer {failed.peer_id[-8:]}: {failed.code}: "
                                  f"{failed.message}", response.done)
            try:
                return (await collecting)[0], response.done
            except InvalidOutput as e:
                raise _PushBroken(str(e), response.done[:-1], blame=last)
            except SwarmError as e:
                raise _PushBroken(f"collecting from {last[-8:]} failed: {type(e).__name__}: {e}", response.done)
        finally:
            pending = [f for f in (collecting, pushing) if not f.done() and f not in self._replies]
            for future in pending:
                future.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _let_reply_come(self, pushing: asyncio.Future) -> None:
        """Keep a push whose result is already collected until its reply arrives (it is not cancelled:
        the peers up the chain are still answering it); its errors are only logged."""
        if pushing.done():
            self._reply_came(pushing)
            return
        self._replies.add(pushing)
        pushing.add_done_callback(self._reply_came)

    def _reply_came(self, pushing: asyncio.Future) -> None:
        self._replies.discard(pushing)
        if not pushing.cancelled() and pushing.exception() is not None:
            logger.debug("the reply of a push already collected: %s", pushing.exception())

    async def _saw_pushed(self, hop: HopDone) -> None:
        """``_saw_step`` for a pushed hop; a stale replica is dropped and the push counts as broken."""
        try:
            self._saw_step(hop.stage, hop.peer_id, hop.optimizer_step)
        except StaleReplica as e:
            await self._drop(hop.peer_id, e)
            raise _PushBroken(str(e), None) from None

    async def _count_pushed(self, trace: Trace, done: Sequence[HopDone], *, blamed: str | None = None) -> set[int]:
        """Put the pushed backwards that ``done`` reports into the ledger; returns their stages. One
        whose peer is banned by now (dropped while the push was under way, or stale) does not count:
        it is rebuilt on another replica."""
        counted = set()
        for hop in done:
            try:
                self._saw_step(hop.stage, hop.peer_id, hop.optimizer_step)
            except StaleReplica as e:
                await self._drop(hop.peer_id, e)
            if hop.peer_id in self.banned() or hop.peer_id == blamed:
                continue
            self._ledger[hop.stage][hop.peer_id].append(
                _Contribution(trace.hops[hop.stage], None, trace.num_samples, trace))
            counted.add(hop.stage)
        return counted

    async def _broken(self, error: _PushBroken, what: str) -> None:
        """A push that broke: counted and logged; a peer that returned an invalid result is dropped
        (as on the relayed path). Anything else is judged by the relayed path that redoes the work."""
        self.push_fallbacks += 1
        logger.warning("a pushed %s broke (%s); going through the trainer for it", what, error)
        if error.blame is not None:
            self.penalties[error.blame] += 1
            await self._drop(error.blame, InvalidOutput(str(error)))

    async def _rebuild(self, trace: Trace, stages: set[int], *, down_to: int) -> torch.Tensor:
        """Redo a pushed microbatch through the trainer so that ``stages`` count its backward (once:
        by request id, on the peer that had it if it is still there), and return the gradient of
        stage ``down_to``'s input. The inputs the trainer never held are recomputed first (forwards
        that keep no graph, with each hop's own dropout seed, so they equal what was pushed); the
        later stages run their backward without counting it again."""
        _, mask, positions = trace.hops[0].inputs
        for stage in range(len(trace.hops) - 1):
            if trace.hops[stage + 1].inputs is None:
                hidden = await self._recompute(stage, trace.hops[stage])
                trace.hops[stage + 1].inputs = (hidden, mask, positions)
        grad = trace.grad
        for stage in reversed(range(down_to, len(trace.hops))):
            grad = await self._backward_hop(stage, trace.hops[stage], grad, trace.num_samples,
                                            accumulate=stage in stages)
        if stages:
            logger.info("rebuilt a pushed microbatch through the trainer for stage(s) %s", sorted(stages))
        return grad

    async def _replay_pushed(self, stage: int, contribution: _Contribution) -> None:
        """A pushed backward that a dropped peer had counted, redone on another replica of ``stage``.
        Its input and output gradient come from the peers of the hops before and after it, which keep
        them (``peers.training.executor``: computed before any step applied since, which a recompute at step
        time would not be); only a neighbour that lost them makes it a rebuild by recomputing."""
        trace, hop = contribution.trace, contribution.hop
        first = trace.hops[0].inputs
        try:
            if hop.inputs is None:
                before = trace.hops[stage - 1]
                hidden = await self.client.kept(before.hop.peer_id, stage - 1, before.hop.layers, before.request_id,
                                                first[0])
                hop.inputs = (hidden, *first[1:])
            grad = trace.grad
            if stage < len(trace.hops) - 1:
                after = trace.hops[stage + 1]
                grad = await self.client.kept(after.hop.peer_id, stage + 1, after.hop.layers, after.request_id,
                                              trace.grad, grad=True)
        except SwarmError as e:
            logger.warning("stage %d: a neighbouring hop no longer keeps what a pushed backward needs (%s: %s); "
                           "recomputing it", stage, type(e).__name__, e)
            await self._rebuild(trace, {stage}, down_to=stage)
            return
        await self._backward_hop(stage, hop, grad, contribution.num_samples)

    async def _recompute(self, stage: int, hop: _HopTrace) -> torch.Tensor:
        """``hop``'s output again (no graph kept), on its peer or another replica."""

        async def call(peer: str) -> torch.Tensor:
            hidden, _ = await self.client.forward(peer, stage, hop.hop.layers, uuid.uuid4().hex, hop.inputs,
                                                  train=False, seed=hop.seed)
            return hidden

        hidden, _ = await self._on_replica(stage, call, prefer=hop.hop.peer_id)
        return hidden

    async def _run_schedule(
        self, schedule: list[Action], run: Callable[[Action, torch.Tensor], Awaitable[torch.Tensor]],
        inputs: Sequence[torch.Tensor], routes: Sequence[Sequence[Hop]],
    ) -> dict[tuple[int, int], torch.Tensor]:
        """Run ``schedule``: each stage takes its actions in the schedule's order, each action once the
        one it depends on is done, with up to ``depth`` x (peers routed for that stage) calls in flight
        per stage, so a peer has its next microbatch queued while it computes. The first failure
        (after the failover in ``run``) cancels the rest and is raised as itself."""
        num_stages = self.manifest.num_stages
        loop = asyncio.get_running_loop()
        done: dict[tuple[int, int], asyncio.Future] = {(a.microbatch, a.stage): loop.create_future() for a in schedule}

        async def one(action: Action, value: torch.Tensor, slots: asyncio.Semaphore) -> None:
            try:
                done[(action.microbatch, action.stage)].set_result(await run(action, value))
            finally:
                slots.release()

        async def feed(stage: int, group: asyncio.TaskGroup) -> None:
            slots = asyncio.Semaphore(self.depth * len({route[stage].peer_id for route in routes}))
            for action in actions_of_stage(schedule, stage):
                before = dependency(action, num_stages)
                value = inputs[action.microbatch] if before is None else await done[(before.microbatch, before.stage)]
                await slots.acquire()
                group.create_task(one(action, value, slots))

        try:
            async with asyncio.TaskGroup() as group:
                for stage in range(num_stages):
                    group.create_task(feed(stage, group))
        except BaseExceptionGroup as e:
            raise _first_error(e) from None
        return {key: future.result() for key, future in done.items()}

    # -- the collaborative step -----------------------------------------------------------------

    async def commit(self, num_samples: int) -> StepStatus:
        """Count a finished backward pass of ``num_samples`` sequences. When the run's step is then
        closed (by this trainer or together with others), apply it on every stage before returning.

        A trainer alone in the run (its last read of the trainers' records saw no other) whose samples
        close the step applies it at once and publishes its commit afterwards, while its next batch
        computes: the DHT round trips of a commit (tens of ms each on a WAN) leave the step's critical
        path. A trainer that appears meanwhile is seen by that read, and the next step goes the
        common way."""
        started, applying = time.perf_counter(), self.timings["averaging"]
        try:
            return await self._commit(num_samples)
        finally:
            self.timings["commit"] += time.perf_counter() - started - (self.timings["averaging"] - applying)

    async def _commit(self, num_samples: int) -> StepStatus:
        await self.settle()
        step = self.step or 0
        self.last_closed = None
        self._step_samples += num_samples
        # when our samples alone close the step, the replicas' records are read for it while the
        # samples are committed (both DHT round trips, tens of ms each on a WAN), if the backward
        # has not already read them
        closing = self._step_samples >= self.manifest.target_batch_size
        records, self._step_records = self._step_records, None
        if closing and records is None:
            records = asyncio.ensure_future(self._current_records(fresh=True))
        if closing and self._alone and self.coordinator.defer_commits:
            return await self._commit_alone(step, records)
        try:
            status = await self.coordinator.commit(step, self._step_samples)
            status = await wait_until_closed(self.coordinator, status, batch=num_samples, timeout=self.policy.step_wait)
            if status.closed:
                if records is not None:
                    await records
                await self.apply(step, fresh=records is None)
                await self.coordinator.finished(step)
                self.last_closed = status
            self._alone = status.alone
        finally:
            if records is not None:
                await asyncio.gather(records, return_exceptions=True)
        return status

    async def _commit_alone(self, step: int, records: asyncio.Future) -> StepStatus:
        samples, me = self._step_samples, self.coordinator.me
        try:
            await records
        except BaseException:
            await asyncio.gather(records, return_exceptions=True)
            raise
        await self.apply(step, fresh=False)
        self.last_closed = StepStatus(step, samples, self.manifest.target_batch_size, (me,), 0)
        self._announcing = asyncio.create_task(self._announce(step, samples), name="trainer-commit")
        return self.last_closed

    async def _announce(self, step: int, samples: int) -> None:
        """Publish a step applied alone, and look again whether this trainer is still alone."""
        try:
            status = await self.coordinator.commit(step, samples)
            await self.coordinator.finished(step)
            self._alone = status.alone
            if not status.alone:
                logger.info("another trainer is in the run: steps are committed before they are applied again")
        except Exception as e:  # a DHT hiccup: the next step commits the common way, which retries
            self._alone = False
            logger.warning("publishing step %d's commit failed: %s: %s", step, type(e).__name__, e)

    async def settle(self, timeout: float = 60.0) -> None:
        """Wait (bounded) for a commit still being published (``commit``; before leaving the run)."""
        task, self._announcing = self._announcing, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except asyncio.TimeoutError:
                task.cancel()
                self._alone = False
                logger.warning("publishing the last step's commit took over %.0f s; given up", timeout)

    async def apply(self, step: int, *, fresh: bool = True) -> None:
        """Have every live replica of every stage apply ``step``: the replicas of a stage sum their
        gradients (hivemind averaging) and step alike. A member that fails is dropped (its backwards
        replayed on the others) and the stage tries again, up to ``policy.step_attempts`` rounds.
        ``fresh=False``: the caller has just read the records."""
        started = time.perf_counter()
        try:
            await self._apply(step, fresh=fresh)
        finally:
            self.timings["averaging"] += time.perf_counter() - started

    async def _apply(self, step: int, *, fresh: bool) -> None:
        if fresh:
            await self._current_records(fresh=True)
        await self._readmit()  # a replica whose ban just ended and that answers is a member, lest it fall behind
        pending = set(range(self.manifest.num_stages))
        for attempt in range(1, self.policy.step_attempts + 1):
            plans = {stage: await self._members(stage, step) for stage in sorted(pending)}
            await self._probe(plans, step)
            scheduled = get_dht_time() + self.policy.averaging_window
            calls = [(stage, peer) for stage, members in plans.items() for peer in members]
            results = await asyncio.gather(*(self._step_call(stage, peer, step, plans[stage], scheduled)
                                             for stage, peer in calls), return_exceptions=True)
            # a stage whose group applied the step with every member summed every member's backwards,
            # also those of a member that failed after its part of the round: those are not replayed
            applied = {stage for (stage, _), result in zip(calls, results)
                       if not isinstance(result, BaseException) and result.group_size == len(plans[stage])}
            for (stage, peer), result in zip(calls, results):
                if not isinstance(result, BaseException):
                    self._peer_steps[peer] = result.optimizer_step
                elif stage in applied:
                    await self._left_behind(stage, peer, step, result)
                else:
                    await self._step_failed(stage, peer, step, result, attempt)
            pending = {stage for (stage, _), result in zip(calls, results)
                       if isinstance(result, BaseException) and stage not in applied}
            if not pending:
                break
        else:
            raise AveragingFailed(f"step {step} could not be applied on stage(s) {sorted(pending)} "
                                  f"in {self.policy.step_attempts} rounds")
        self.step = step + 1
        self._ledger.clear()
        self._step_samples = 0

    async def _step_call(self, stage: int, peer: str, step: int, members: list[str], scheduled: float) -> StepResponse:
        """One member's step. A member found gone (its call failed, not its averaging) would keep the
        others of its stage waiting for their group until ``peer.averaging_timeout``: they are told to
        give the round up at once (bounded; a member that already finished ignores it)."""
        layers = self.manifest.stages[stage]
        try:
            return await self.client.step(peer, stage, layers, step, members, scheduled)
        except PeerUnavailable as e:
            if not isinstance(e, (AveragingFailed, StageTimeout)):
                others = [p for p in members if p != peer]
                await asyncio.gather(*(asyncio.wait_for(self.client.abort(p, stage, layers, step, members), 5.0)
                                       for p in others), return_exceptions=True)
            raise

    async def _members(self, stage: int, step: int) -> list[str]:
        """The replicas that take part in ``step``: every live one, minus those known to be behind
        (unless nobody else is left: a stage restored from an old checkpoint adopts the run's step)."""
        holding = set(self._ledger.get(stage, {}))
        live = set(self._replicas(stage)) | holding
        current = {p for p in live if self._peer_steps.get(p, step) >= step}
        members = current or live
        if not members:
            members = {await self._pick(stage)}
        return sorted(members)

    async def _probe(self, plans: dict[int, list[str]], step: int) -> None:
        """Ask the members that hold nothing of ours whether they are alive and current before the
        round: a dead member would keep the others waiting for their group until they time out."""
        holding = {p for by_peer in self._ledger.values() for p in by_peer}
        unknown = sorted({p for members in plans.values() for p in members} - holding)
        stage_of = {p: stage for stage, members in sorted(plans.items(), reverse=True) for p in members}
        infos = await asyncio.gather(*(asyncio.wait_for(self.client.info(p, stage_of[p]), self.policy.averaging_window + 5)
                                       for p in unknown), return_exceptions=True)
        for peer, info in zip(unknown, infos):
            if isinstance(info, BaseException):
                await self._drop(peer, info)
            elif info.optimizer_step < step:
                self._peer_steps[peer] = info.optimizer_step
            else:
                continue
            for stage, members in plans.items():
                if peer in members and (len(members) > 1 or isinstance(info, BaseException)):
                    members.remove(peer)
            for stage, members in plans.items():
                if not members:
                    plans[stage] = [await self._pick(stage)]

    async def _left_behind(self, stage: int, peer: str, step: int, error: BaseException) -> None:
        """The other members of ``stage`` applied ``step`` with this member's gradients in the sum, but
        its own call failed: unless it says it applied the step too, it is behind (or gone). It is left
        out for a while; what it held is in the applied step, so nothing is replayed."""
        try:
            info = await asyncio.wait_for(self.client.info(peer, stage), self.policy.averaging_window + 5)
        except (SwarmError, asyncio.TimeoutError):
            info = None
        if info is not None and info.optimizer_step > step:
            self._peer_steps[peer] = info.optimizer_step
            return
        self._peer_steps[peer] = info.optimizer_step if info is not None else step
        self._ledger.get(stage, {}).pop(peer, None)
        self._ban(peer, error)

    async def _step_failed(self, stage: int, peer: str, step: int, error: BaseException, attempt: int) -> None:
        """A member's step call failed. Its reply may merely have been lost after it applied the step:
        it is asked (read-only) where it stands before it is dropped, lest a live replica that is
        current be banned and the backwards it already applied be replayed elsewhere."""
        if isinstance(error, PeerUnavailable) and not isinstance(error, (AveragingFailed, StageTimeout)):
            try:
                info = await asyncio.wait_for(self.client.info(peer, stage), self.policy.averaging_window + 5)
            except (SwarmError, asyncio.TimeoutError):
                pass
            else:
                if info.optimizer_step > step:
                    self._peer_steps[peer] = info.optimizer_step
                    return
        if isinstance(error, AveragingFailed):  # another member let the group down, not this one
            logger.warning("stage %d, step %d: averaging failed on %s (round %d): %s", stage, step, peer[-8:],
                           attempt, error)
            return
        if not isinstance(error, SwarmError) or recovery_for(error) is Recovery.ABORT:
            raise error
        await self._drop(peer, error)


async def _all(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Run ``coros`` together and return their results in order; the first failure cancels the rest
    and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coro) for coro in coros]
    except BaseExceptionGroup as e:
        raise _first_error(e) from None
    return [task.result() for task in tasks]


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error a failed schedule raises: the first one that is not a consequence of cancelling."""
    leaves = []
    stack: list[BaseException] = [group]
    while stack:
        error = stack.pop(0)
        if isinstance(error, BaseExceptionGroup):
            stack[:0] = list(error.exceptions)
        else:
            leaves.append(error)
    return next((e for e in leaves if not isinstance(e, asyncio.CancelledError)), leaves[0])
