"""The trainer's side of the data plane: batches through the route, forward and backward, and the
collaborative step that closes them, surviving peers that die, hang or err mid-step.

``RemotePipeline`` is a facade over its parts, one module each:

* ``trainer.replicas``: which replica of each stage to call and which to leave out (the DHT's records,
  bans and the probes that end them, routes);
* ``trainer.pushing``: the push path (``push=True``, training only), activations peer to peer;
* ``trainer.commit``: the backwards each replica holds in the open step, and the step's commit and
  application;
* ``trainer.faults``: what to do after each failure, as pure functions.

This module keeps the relayed path: the trainer calls stage 0, then stage 1 with stage 0's output,
and so on, and in reverse for gradients. A ``Trace`` remembers, per stage, the peer and the inputs of
each forward so the backward can go to the same peer (which still holds the graph) or, after a
``CacheMiss`` or a failover, to another replica with the inputs resent. Pushes that break are redone
through it.

Fault tolerance: when a call fails, ``swarm.errors.recovery_for`` and ``trainer.faults`` decide: abort
(a malformed request), or route around the peer: it is banned for ``ban_time`` and everything it had
accumulated in this step is replayed on another replica of its stage, so no microbatch is lost. The
only replica of a stage is retried a few times first (a lost reply is far likelier than a dead peer);
after that the trainer waits, bounded and saying so, for a peer to take the stage over.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import Counter
from typing import Awaitable, Callable, Mapping, Sequence, TypeVar

import torch

from dht.schemas import Manifest, PeerRecord
from peers.training.client import StageClient, StageInputs
from peers.training.routing import Hop
from shards.schedule import Action, Phase, actions_of_stage, dependency, gpipe_schedule
from trainer.commit import StepCommit
from core.errors import InvalidOutput, SwarmError
from trainer.faults import FaultPolicy, OnFailure, after_call_failure
from trainer.pushing import PushPath
from trainer.replicas import RecordSource, Replicas
from trainer.spotcheck import SpotChecker, run_tolerance
from trainer.steps import LocalCoordinator, StepCoordinator, StepStatus
from trainer.tasks import first_error
from trainer.traces import Contribution, HopTrace, Trace, Wiring
from core.types import PeerId, StageIndex

__all__ = ["RemotePipeline", "Trace", "RecordSource", "FaultPolicy"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


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
        cached_routes: bool = True,
    ):
        """``spot_check`` (default: one at ``policy.spot_check_rate`` that reports to nobody) recomputes
        some forwards on another replica; a replica caught is banned like a failed one. ``depth``:
        calls in flight per peer of a stage while a batch's microbatches are pipelined (pushed:
        microbatches in flight per stage). ``push``: training microbatches go peer to peer
        (``trainer.pushing``). ``cached_routes``: routes and steps use the records in view while they
        are read again in the background (``Replicas.step_view``); False waits for every read."""
        self._wiring = Wiring(manifest, client, policy)
        self.push = push
        self.depth = depth
        self.failovers = 0  # calls routed around a failed peer (for logs and benchmarks)
        self.penalties: Counter[str] = Counter()  # invalid outputs per peer (each also banned it)
        self.replicas = Replicas(self._wiring, records, route_ttl=route_ttl, route_wait=route_wait, seed=seed,
                                 cached=cached_routes)
        self.steps = StepCommit(self._wiring, self.replicas, coordinator or LocalCoordinator(manifest.target_batch_size),
                                self.drop)
        self.pushing = PushPath(self)
        self.spot_check = spot_check or SpotChecker(
            client, rate=policy.spot_check_rate, tolerance=run_tolerance(manifest.dtype, policy.spot_check_tolerance),
            rng=random.Random(seed))

    @property
    def manifest(self) -> Manifest:
        return self._wiring.manifest

    @property
    def client(self) -> StageClient:
        """The stage client every part calls with; setting it changes it for all of them."""
        return self._wiring.client

    @client.setter
    def client(self, client: StageClient) -> None:
        self._wiring.client = client

    @property
    def policy(self) -> FaultPolicy:
        """The fault-tolerance bounds every part applies; setting it changes them for all of them."""
        return self._wiring.policy

    @policy.setter
    def policy(self, policy: FaultPolicy) -> None:
        self._wiring.policy = policy

    @property
    def timings(self) -> Counter[str]:
        """Wall seconds spent reading the DHT's records, applying and committing steps (``Wiring``)."""
        return self._wiring.timings

    @property
    def coordinator(self) -> StepCoordinator:
        """How this trainer meets the others in the run's steps (``trainer.steps``)."""
        return self.steps.coordinator

    @coordinator.setter
    def coordinator(self, coordinator: StepCoordinator) -> None:
        self.steps.coordinator = coordinator

    @property
    def step(self) -> int | None:
        """The run's collaborative step, learned from the replicas (None: none answered yet)."""
        return self.replicas.step

    @step.setter
    def step(self, step: int | None) -> None:
        self.replicas.step = step

    @property
    def last_closed(self) -> StepStatus | None:
        """The step the last backward pass closed, if any."""
        return self.steps.last_closed

    @property
    def push_fallbacks(self) -> int:
        """Pushes that broke and were rebuilt through the trainer."""
        return self.pushing.fallbacks

    async def view(self, *, fresh: bool = False) -> Mapping[int, Sequence[PeerRecord]]:
        """The records this trainer routes over (``Replicas.current``): the view in hand, renewed in the
        background once it is old, or read now when ``fresh`` (or when a peer in it failed a call).
        Generation plans from it, so no DHT read sits between ``generate`` and its first token."""
        return await self.replicas.current(fresh=fresh)

    def banned(self) -> set[str]:
        """Peers left out of routes and steps (``Replicas.banned``)."""
        return self.replicas.banned()

    async def route(self, tokens: int = 1) -> tuple[Hop, ...]:
        """A peer for every stage (``Replicas.route``)."""
        return await self.replicas.route(tokens)

    async def commit(self, num_samples: int) -> StepStatus:
        """Count a finished backward pass; apply the step if that closed it (``StepCommit.commit``)."""
        return await self.steps.commit(num_samples)

    async def settle(self, timeout: float = 60.0) -> None:
        """Wait (bounded) for a commit still being published (``StepCommit.settle``), and end a
        background read of the records (before the DHT is stopped)."""
        await self.steps.settle(timeout)
        await self.replicas.close()

    async def apply(self, step: int, *, fresh: bool = True) -> None:
        """Have every live replica of every stage apply ``step`` (``StepCommit.apply``)."""
        await self.steps.apply(step, fresh=fresh)

    # -- calls with failover ---------------------------------------------------------------------

    async def on_replica(self, stage: StageIndex, call: Callable[[str], Awaitable[T]], prefer: str | None = None) -> tuple[T, str]:
        """Run ``call(peer)`` on a replica of ``stage``, routing around peers that fail (see module doc;
        what follows each failure: ``trainer.faults.after_call_failure``)."""
        replicas, policy = self.replicas, self.policy
        peer = prefer if prefer is not None and prefer not in replicas.banned() else await replicas.pick(stage)
        same_peer_tries = 0
        for attempt in range(1, policy.attempts + 1):
            if attempt > 1 and peer in replicas.banned():  # another call in flight found it failing and dropped it
                peer, same_peer_tries = await replicas.pick(stage), 0
                logger.warning("stage %d: going on with peer %s (attempt %d/%d)", stage, peer[-8:], attempt,
                               policy.attempts)
            try:
                return await call(peer), peer
            except SwarmError as e:
                alone = not [p for p in replicas.live(stage) if p != peer]
                verdict = after_call_failure(e, attempt=attempt, tries=same_peer_tries, alone=alone,
                                             dropped=peer in replicas.banned(), policy=policy)
                if verdict is OnFailure.RAISE:
                    raise
                if isinstance(e, InvalidOutput):
                    self.penalties[peer] += 1
                if verdict is OnFailure.ELSEWHERE:
                    continue
                if verdict is OnFailure.RETRY:
                    same_peer_tries += 1
                    logger.warning("stage %d: peer %s failed (attempt %d/%d): %s; trying it again", stage, peer[-8:],
                                   attempt, policy.attempts, e)
                    if alone:  # another replica waits otherwise: a lost reply is retried at once
                        await asyncio.sleep(policy.backoff * 2 ** (same_peer_tries - 1))
                    continue
                self.failovers += 1
                await self.drop(peer, e)
                peer, same_peer_tries = await replicas.pick(stage), 0
                logger.warning("stage %d: going on with peer %s (attempt %d/%d)", stage, peer[-8:], attempt + 1,
                               policy.attempts)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def drop(self, peer_id: PeerId, why: BaseException) -> None:
        """Ban ``peer_id`` and replay on other replicas every backward it holds in the open step."""
        self.replicas.ban(peer_id, why)
        for stage, by_peer in list(self.steps.ledger.items()):
            lost = by_peer.pop(peer_id, [])
            for contribution in lost:
                if contribution.grad_output is None:  # pushed: this trainer never held its input nor gradient
                    await self.pushing.replay(stage, contribution)
                else:
                    await self.backward_hop(stage, contribution.hop, contribution.grad_output,
                                            contribution.num_samples)
            if lost:
                logger.info("stage %d: replayed %d backward(s) that peer %s held", stage, len(lost), peer_id[-8:])

    async def backward_hop(self, stage: StageIndex, hop: HopTrace, grad_output: torch.Tensor, num_samples: int, *,
                           accumulate: bool = True) -> torch.Tensor:
        """One stage's backward with failover, held in the open step's ledger. ``accumulate=False``: only
        the input gradient, nothing counted on the stage nor in the ledger."""
        layers = self.manifest.stages[stage]

        async def call(peer: PeerId):
            return await self.client.backward(peer, stage, layers, hop.request_id, grad_output, hop.inputs,
                                              num_samples=num_samples, seed=hop.seed, accumulate=accumulate)

        async def checked(peer: PeerId):
            result = await call(peer)
            if accumulate:  # a rebuild's other hops may run while the step is being applied: no news of the run
                self.steps.saw_step(stage, peer, result[1].optimizer_step)
            return result

        (grad_input, _), peer = await self.on_replica(stage, checked, prefer=hop.hop.peer_id)
        if not accumulate:
            return grad_input
        if peer in self.banned():  # dropped while this call was in flight: its replay did not see this one
            return await self.backward_hop(stage, hop, grad_output, num_samples)
        self.steps.hold(stage, peer, Contribution(hop, grad_output, num_samples))
        return grad_input

    async def forward_hop(self, hop: Hop, inputs: StageInputs, *, train: bool,
                          spot_check: bool | None = None) -> tuple[torch.Tensor, HopTrace]:
        """One stage's forward with failover; ``spot_check`` (None: drawn at the policy's rate) compares
        a training forward with another replica's."""
        request_id = uuid.uuid4().hex
        seed = self.replicas.rng.randrange(2**31)
        tokens = inputs[0].shape[0] * inputs[0].shape[1]

        async def call(peer: PeerId):
            started = time.perf_counter()
            result = await self.client.forward(peer, hop.stage, hop.layers, request_id, inputs, train=train, seed=seed)
            self.replicas.observe(peer, time.perf_counter() - started, tokens)
            self.steps.saw_step(hop.stage, peer, result[1].optimizer_step)
            return result

        (hidden, _), peer = await self.on_replica(hop.stage, call, prefer=hop.peer_id)
        if train and (self.spot_check.wants() if spot_check is None else spot_check):
            hidden, peer = await self._spot_check(hop, peer, inputs, seed, hidden)
        return hidden, HopTrace(Hop(hop.stage, hop.layers, peer), request_id, inputs, seed)

    async def _spot_check(self, hop: Hop, peer: PeerId, inputs: StageInputs, seed: int,
                          output: torch.Tensor) -> tuple[torch.Tensor, str]:
        """Recompute ``peer``'s output on another replica; a replica caught lying is dropped like a
        failed one (banned, its backwards of the open step replayed elsewhere) and the microbatch goes
        on with the honest output (from the replica that computed it: the backward follows it there)."""
        verdict = await self.spot_check.check(hop.stage, hop.layers, peer, self.replicas.live(hop.stage), inputs, seed,
                                              output, self.replicas.peer_steps.get(peer, 0))
        for liar in verdict.caught:
            self.penalties[liar] += 1
            await self.drop(liar, InvalidOutput(verdict.reason))
        return verdict.output, verdict.peer

    def tainted(self, traces: Sequence[Trace]) -> list[int]:
        """The indices of ``traces`` whose forward went through a peer that a spot check has caught
        since: their outputs are suspect. Nothing of them is accumulated before their backward, so
        running their forwards again (``recompute``) leaves the step as if the liar had not been there."""
        liars = {peer for peer, _ in self.spot_check.caught}
        return [i for i, trace in enumerate(traces) if any(h.hop.peer_id in liars for h in trace.hops)]

    # -- forward and backward ---------------------------------------------------------------------

    async def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None, *, train: bool
    ) -> tuple[torch.Tensor, Trace]:
        """One microbatch through every stage (see ``forward_microbatches``)."""
        return (await self.forward_microbatches([(hidden, mask, positions)], train=train))[0]

    async def backward(self, trace: Trace, grad_output: torch.Tensor) -> torch.Tensor:
        """One microbatch's gradient back through every stage (see ``backward_microbatches``)."""
        return (await self.backward_microbatches([trace], [grad_output]))[0]

    async def forward_microbatches(self, parts: Sequence[StageInputs], *, train: bool) -> list[tuple[torch.Tensor, Trace]]:
        """Every microbatch through every stage, pipelined (``shards.schedule``): while stage 1
        computes microbatch 0, stage 0 computes microbatch 1. Each microbatch's route is planned
        before any is sent, each counting those planned before it, so replicas share the work."""
        routes = await self.replicas.plan_routes(parts)
        if train and self.push:
            return await self.pushing.each(len(parts), lambda m: self.pushing.forward(parts[m], routes[m]))
        traces = [Trace(num_samples=hidden.shape[0]) for hidden, _, _ in parts]
        hops: list[dict[int, HopTrace]] = [{} for _ in parts]

        async def run(action: Action, hidden: torch.Tensor) -> torch.Tensor:
            _, mask, positions = parts[action.microbatch]
            hidden, hop = await self.forward_hop(routes[action.microbatch][action.stage], (hidden, mask, positions),
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
        self.steps.read_records_if_closing(sum(trace.num_samples for trace in traces))
        if any(trace.pushed for trace in traces):
            return await self.pushing.each(len(traces), lambda m: self.pushing.backward(traces[m], grads[m]))

        async def run(action: Action, grad: torch.Tensor) -> torch.Tensor:
            trace = traces[action.microbatch]
            return await self.backward_hop(action.stage, trace.hops[action.stage], grad, trace.num_samples)

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
        microbatch's turn overlaps the others' compute. Returns each microbatch's input gradient
        (``PushPath.train_microbatches``)."""
        if not self.push:
            raise ValueError("train_microbatches overlaps pushed microbatches; a relaying pipeline runs "
                             "forward_microbatches, then backward_microbatches")
        return await self.pushing.train_microbatches(parts, loss)

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

        async def feed(stage: StageIndex, group: asyncio.TaskGroup) -> None:
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
            raise first_error(e) from None
        return {key: future.result() for key, future in done.items()}
