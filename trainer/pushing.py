"""The push path (``push=True``, training only): the trainer sends a microbatch to stage 0's peer with
its route, each peer sends its output straight to the next (``peers.training.push``) and the trainer collects
the last one's; gradients go the same way in reverse. The trainer then holds only the ends of each
microbatch (its input, the gradient of its output, and every hop's request id and dropout seed),
which is enough to rebuild any hop exactly: a push that breaks, and every backward a dropped peer
held, are redone through the relayed path (``_rebuild``: the forward recomputed without keeping
graphs, then the backward through every later stage without counting it again, and through the
stages that lost it counted)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from typing import Awaitable, Callable, Protocol, Sequence, TypeVar

import torch

from dht.schemas import Manifest
from peers.training.client import StageClient, StageInputs
from peers.training.protocol import HopDone, PushHop
from peers.training.routing import Hop
from trainer.commit import StepCommit
from core.errors import InvalidOutput, StaleReplica, SwarmError
from trainer.replicas import Replicas
from trainer.spotcheck import SpotChecker
from trainer.tasks import gather_all
from trainer.traces import Contribution, HopTrace, Trace
from core.types import PeerId, StageIndex

__all__ = ["PushPath", "Relay"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Relay(Protocol):
    """The relayed path a push falls back to (``trainer.pipeline.RemotePipeline``): calls of one stage
    with failover, and the drop of a peer with the replay of what it held."""

    manifest: Manifest
    client: StageClient
    depth: int
    spot_check: SpotChecker
    replicas: Replicas
    steps: StepCommit
    penalties: Counter[str]

    def tainted(self, traces: Sequence[Trace]) -> list[int]: ...

    async def forward_hop(self, hop: Hop, inputs: StageInputs, *, train: bool,
                          spot_check: bool | None = None) -> tuple[torch.Tensor, HopTrace]: ...

    async def backward_hop(self, stage: StageIndex, hop: HopTrace, grad_output: torch.Tensor, num_samples: int, *,
                           accumulate: bool = True) -> torch.Tensor: ...

    async def on_replica(self, stage: StageIndex, call: Callable[[str], Awaitable[T]],
                         prefer: str | None = None) -> tuple[T, str]: ...

    async def drop(self, peer_id: PeerId, why: BaseException) -> None: ...


class _PushBroken(Exception):
    """A push did not bring its result back. ``done``: the hops it computed (None: not known, the
    reply was lost); ``blame``: a peer that returned an invalid result, if that was the cause."""

    def __init__(self, why: str, done: list[HopDone] | None, blame: str | None = None):
        super().__init__(why)
        self.done, self.blame = done, blame


class PushPath:
    """Training microbatches pushed peer to peer along their routes, redone through ``relay`` where
    a push breaks or a peer that held one of its backwards is dropped."""

    def __init__(self, relay: Relay):
        self.relay = relay
        self.fallbacks = 0  # pushes that broke and were rebuilt through the trainer
        self._replies: set[asyncio.Future] = set()  # replies of pushes already collected (``_pushed``)

    async def train_microbatches(self, parts: Sequence[StageInputs],
                                 loss: Callable[[int, torch.Tensor], Awaitable[torch.Tensor]]) -> list[torch.Tensor]:
        """Forward and backward of every training microbatch, pushed, each one's backward started as
        soon as ``loss(m, output)`` has turned its output into that output's gradient, while later
        microbatches are still going forward (see ``RemotePipeline.train_microbatches``).

        Spot checks are drawn for every microbatch first, and no backward starts until the drawn ones
        are done: a liar they catch has then had no backward counted anywhere, and the microbatches
        it touched are redone (as ``tainted`` lets the two-phase path redo them)."""
        relay = self.relay
        routes = await relay.replicas.plan_routes(parts)
        checks = [[relay.spot_check.wants() for _ in route] for route in routes]
        unchecked = sum(any(drawn) for drawn in checks)
        checked = asyncio.Event()
        if not unchecked:
            checked.set()
        samples = sum(hidden.shape[0] for hidden, _, _ in parts)
        slots = asyncio.Semaphore(relay.depth * relay.manifest.num_stages)

        async def one(m: int) -> torch.Tensor:
            nonlocal unchecked
            async with slots:
                output, trace = await self.forward(parts[m], routes[m], checks[m])
            if any(checks[m]):
                unchecked -= 1
                if not unchecked:
                    checked.set()
            await checked.wait()
            for _ in range(3):  # bounded, as in SwarmModelForCausalLM: a redo may meet another liar
                if not relay.tainted([trace]):
                    break
                hidden = parts[m][0]
                route = await relay.replicas.route(hidden.shape[0] * hidden.shape[1])
                async with slots:
                    output, trace = await self.forward(parts[m], route, [False] * len(route))
            grad = await loss(m, output)
            relay.steps.read_records_if_closing(samples)
            async with slots:
                return await self.backward(trace, grad)

        order = sorted(range(len(parts)), key=lambda m: not any(checks[m]))  # the checked ones first
        grads = dict(zip(order, await gather_all(one(m) for m in order)))
        return [grads[m] for m in range(len(parts))]

    async def each(self, count: int, run: Callable[[int], Awaitable[T]]) -> list[T]:
        """``run(m)`` for every microbatch, ``depth`` x stages of them in flight (each stage's peer
        queues its share, so stages compute different microbatches at once); the first failure
        cancels the rest and is raised as itself."""
        slots = asyncio.Semaphore(self.relay.depth * self.relay.manifest.num_stages)

        async def one(m: int) -> T:
            async with slots:
                return await run(m)

        return await gather_all(one(m) for m in range(count))

    async def _relay_forward(self, inputs: StageInputs, route: Sequence[Hop],
                             checks: Sequence[bool] | None = None) -> tuple[torch.Tensor, Trace]:
        """One training microbatch through every stage, relayed by the trainer."""
        hidden, mask, positions = inputs
        trace = Trace(num_samples=hidden.shape[0])
        for stage, hop in enumerate(route):
            hidden, done = await self.relay.forward_hop(hop, (hidden, mask, positions), train=True,
                                                        spot_check=None if checks is None else checks[stage])
            trace.hops.append(done)
        return hidden, trace

    async def forward(self, inputs: StageInputs, route: Sequence[Hop],
                      checks: Sequence[bool] | None = None) -> tuple[torch.Tensor, Trace]:
        """One training microbatch pushed along ``route``; relayed instead when a spot check is drawn
        for one of its hops (``checks``, default: drawn here; the check needs that hop's input) or
        when the push breaks."""
        checks = [self.relay.spot_check.wants() for _ in route] if checks is None else checks
        if any(checks):
            return await self._relay_forward(inputs, route, checks)
        hidden, mask, positions = inputs
        rng = self.relay.replicas.rng
        hops = [HopTrace(hop, uuid.uuid4().hex, inputs if hop.stage == 0 else None, rng.randrange(2**31))
                for hop in route]
        try:
            output, done = await self._pushed(hops, hidden, like=hidden, mask=mask, positions=positions)
            for hop in done:
                await self._saw_pushed(hop)
        except _PushBroken as e:
            await self._broken(e, "forward")
            return await self._relay_forward(inputs, route)
        return output, Trace(hops=hops, num_samples=hidden.shape[0])

    async def backward(self, trace: Trace, grad_output: torch.Tensor) -> torch.Tensor:
        """The gradient of one microbatch's output pushed back along its forward's hops; the hops
        that did not count it (the push broke, or their peer was dropped meanwhile) are rebuilt."""
        trace.grad = grad_output
        if not trace.pushed:  # relayed forward (a spot check, or a push that broke)
            grad = grad_output
            for stage in reversed(range(len(trace.hops))):
                grad = await self.relay.backward_hop(stage, trace.hops[stage], grad, trace.num_samples)
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

    async def _pushed(self, hops: Sequence[HopTrace], tensor: torch.Tensor, *, like: torch.Tensor,
                      mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                      num_samples: int = 1, backward: bool = False) -> tuple[torch.Tensor, list[HopDone]]:
        """Push ``tensor`` along ``hops`` and collect the last hop's result. A result collected with
        every hop reported done is returned at once: the push's reply, still coming back up the
        chain, would only repeat it. Otherwise the reply says where the chain broke. Raises
        ``_PushBroken`` if the result does not come back."""
        client = self.relay.client
        mailbox = uuid.uuid4().hex
        last = hops[-1].hop.peer_id
        timeout = client.timeout * len(hops)
        collecting = asyncio.ensure_future(client.collect(last, mailbox, like, timeout=timeout))
        pushing = asyncio.ensure_future(client.push(
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
        finally:  # a push whose result came keeps its reply (``_let_reply_come``); the rest ends here
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
        """``StepCommit.saw_step`` for a pushed hop; a stale replica is dropped and the push counts as broken."""
        try:
            self.relay.steps.saw_step(hop.stage, hop.peer_id, hop.optimizer_step)
        except StaleReplica as e:
            await self.relay.drop(hop.peer_id, e)
            raise _PushBroken(str(e), None) from None

    async def _count_pushed(self, trace: Trace, done: Sequence[HopDone], *, blamed: str | None = None) -> set[int]:
        """Put the pushed backwards that ``done`` reports into the ledger; returns their stages. One
        whose peer is banned by now (dropped while the push was under way, or stale) does not count:
        it is rebuilt on another replica."""
        relay = self.relay
        counted = set()
        for hop in done:
            try:
                relay.steps.saw_step(hop.stage, hop.peer_id, hop.optimizer_step)
            except StaleReplica as e:
                await relay.drop(hop.peer_id, e)
            if hop.peer_id in relay.replicas.banned() or hop.peer_id == blamed:
                continue
            relay.steps.hold(hop.stage, hop.peer_id, Contribution(trace.hops[hop.stage], None, trace.num_samples, trace))
            counted.add(hop.stage)
        return counted

    async def _broken(self, error: _PushBroken, what: str) -> None:
        """A push that broke: counted and logged; a peer that returned an invalid result is dropped
        (as on the relayed path). Anything else is judged by the relayed path that redoes the work."""
        self.fallbacks += 1
        logger.warning("a pushed %s broke (%s); going through the trainer for it", what, error)
        if error.blame is not None:
            self.relay.penalties[error.blame] += 1
            await self.relay.drop(error.blame, InvalidOutput(str(error)))

    async def _rebuild(self, trace: Trace, stages: set[StageIndex], *, down_to: int) -> torch.Tensor:
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
            grad = await self.relay.backward_hop(stage, trace.hops[stage], grad, trace.num_samples,
                                                 accumulate=stage in stages)
        if stages:
            logger.info("rebuilt a pushed microbatch through the trainer for stage(s) %s", sorted(stages))
        return grad

    async def replay(self, stage: StageIndex, contribution: Contribution) -> None:
        """A pushed backward that a dropped peer had counted, redone on another replica of ``stage``.
        Its input and output gradient come from the peers of the hops before and after it, which keep
        them (``peers.training.executor``: computed before any step applied since, which a recompute at step
        time would not be); only a neighbour that lost them makes it a rebuild by recomputing."""
        client = self.relay.client
        trace, hop = contribution.trace, contribution.hop
        first = trace.hops[0].inputs
        try:
            if hop.inputs is None:
                before = trace.hops[stage - 1]
                hidden = await client.kept(before.hop.peer_id, stage - 1, before.hop.layers, before.request_id,
                                           first[0])
                hop.inputs = (hidden, *first[1:])
            grad = trace.grad
            if stage < len(trace.hops) - 1:
                after = trace.hops[stage + 1]
                grad = await client.kept(after.hop.peer_id, stage + 1, after.hop.layers, after.request_id,
                                         trace.grad, grad=True)
        except SwarmError as e:
            logger.warning("stage %d: a neighbouring hop no longer keeps what a pushed backward needs (%s: %s); "
                           "recomputing it", stage, type(e).__name__, e)
            await self._rebuild(trace, {stage}, down_to=stage)
            return
        await self.relay.backward_hop(stage, hop, grad, contribution.num_samples)

    async def _recompute(self, stage: StageIndex, hop: HopTrace) -> torch.Tensor:
        """``hop``'s output again (no graph kept), on its peer or another replica."""

        async def call(peer: PeerId) -> torch.Tensor:
            hidden, _ = await self.relay.client.forward(peer, stage, hop.hop.layers, uuid.uuid4().hex, hop.inputs,
                                                        train=False, seed=hop.seed)
            return hidden

        hidden, _ = await self.relay.on_replica(stage, call, prefer=hop.hop.peer_id)
        return hidden
