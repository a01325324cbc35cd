"""The trainer's side of a collaborative step: the backwards each replica holds in the open step
(the ledger), the commit of a finished backward pass to the run's step, and the step's application
on every stage, where the replicas of a stage sum their gradients and step alike.

Every backward a replica accumulates in the open step stays in the ledger (its inputs and gradient)
until the step is applied: a replica dropped meanwhile has its backwards replayed elsewhere
(``RemotePipeline._drop``), and a banned peer is never a member of the step, so nothing it held is
applied twice."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Awaitable, Callable

from hivemind.utils import get_dht_time

from peers.training.protocol import StepResponse
from core.errors import AveragingFailed, SwarmError
from trainer.faults import OnStepFailure, after_step_failure, member_gone, run_step_seen, step_members
from trainer.replicas import Replicas
from trainer.steps import StepCoordinator, StepStatus, wait_until_closed
from trainer.traces import Contribution, Wiring
from core.types import PeerId, StageIndex

__all__ = ["StepCommit", "Drop"]

logger = logging.getLogger(__name__)

Drop = Callable[[str, BaseException], Awaitable[None]]
"""Bans a peer and replays elsewhere every backward it holds in the open step."""


class StepCommit:
    """Counts the samples of finished backward passes towards the run's step (through
    ``coordinator``, with the other trainers) and applies the step on every stage once it closes."""

    def __init__(self, wiring: Wiring, replicas: Replicas, coordinator: StepCoordinator, drop: Drop):
        self.wiring = wiring
        self.replicas = replicas
        self.coordinator = coordinator
        self._drop = drop
        self.last_closed: StepStatus | None = None  # the step the last backward pass closed, if any
        self.ledger: dict[int, dict[str, list[Contribution]]] = defaultdict(lambda: defaultdict(list))
        self._step_samples = 0
        self._alone = False  # the last read of the trainers' records saw no other trainer
        self._announcing: asyncio.Task | None = None  # a lone trainer's commit, published after the step
        self._step_records: asyncio.Future | None = None  # the replicas' records, read during the closing backward

    def hold(self, stage: StageIndex, peer_id: PeerId, contribution: Contribution) -> None:
        """Note a backward that ``peer_id`` accumulated for ``stage`` in the open step."""
        self.ledger[stage][peer_id].append(contribution)

    def _forget_open_step(self) -> None:
        self.ledger.clear()
        self._step_samples = 0

    def saw_step(self, stage: StageIndex, peer_id: PeerId, step: int) -> None:
        """Note a replica's optimizer step (``trainer.faults.run_step_seen``). One ahead of us means
        another trainer closed the step: what we gave it was applied there, so our ledger of it is
        done. Raises ``StaleReplica`` for one behind that must not compute for us."""
        replicas = self.replicas
        replicas.peer_steps[peer_id] = step
        run = replicas.step
        replicas.step = run_step_seen(run, step, stage=stage, peer_id=peer_id,
                                      others=any(p != peer_id for p in replicas.live(stage)))
        if run is not None and replicas.step > run:
            logger.info("the run moved on to step %d (another trainer closed step %d)", step, run)
            self._forget_open_step()

    def read_records_if_closing(self, samples: int) -> None:
        """When ``samples`` more will close the step, start taking the view of the replicas' records
        for it now (``Replicas.step_view``), while the closing backwards run (``commit`` uses it),
        unless that is under way."""
        if self._step_samples + samples >= self.wiring.manifest.target_batch_size and self._step_records is None:
            self._step_records = asyncio.ensure_future(self.replicas.step_view())

    async def commit(self, num_samples: int) -> StepStatus:
        """Count a finished backward pass of ``num_samples`` sequences. When the run's step is then
        closed (by this trainer or together with others), apply it on every stage before returning.

        A trainer alone in the run (its last read of the trainers' records saw no other) whose samples
        close the step applies it at once and publishes its commit afterwards, while its next batch
        computes: the DHT round trips of a commit (tens of ms each on a WAN) leave the step's critical
        path. A trainer that appears meanwhile is seen by that read, and the next step goes the
        common way."""
        timings = self.wiring.timings
        started, applying = time.perf_counter(), timings["averaging"]
        try:
            return await self._commit(num_samples)
        finally:
            timings["commit"] += time.perf_counter() - started - (timings["averaging"] - applying)

    async def _commit(self, num_samples: int) -> StepStatus:
        await self.settle()
        step = self.replicas.step or 0
        self.last_closed = None
        self._step_samples += num_samples
        # when our samples alone close the step, its members come from the view in hand while the
        # samples are committed, and the records are read behind it for the next step (uncached:
        # read now; both DHT round trips, tens of ms each on a WAN), unless the backward did that
        closing = self._step_samples >= self.wiring.manifest.target_batch_size
        records, self._step_records = self._step_records, None
        if closing and records is None:
            records = asyncio.ensure_future(self.replicas.step_view())
        try:
            if closing and self._alone and self.coordinator.defer_commits:
                return await self._commit_alone(step, records)
            status = await self.coordinator.commit(step, self._step_samples)
            status = await wait_until_closed(self.coordinator, status, batch=num_samples,
                                             timeout=self.wiring.policy.step_wait)
            if status.closed:
                if records is not None:
                    await records
                await self.apply(step, fresh=records is None)
                await self.coordinator.finished(step)
                self.last_closed = status
            self._alone = status.alone
        finally:  # the read is never left running, whatever failed
            if records is not None:
                await asyncio.gather(records, return_exceptions=True)
        return status

    async def _commit_alone(self, step: int, records: asyncio.Future) -> StepStatus:
        samples, me = self._step_samples, self.coordinator.me
        await records
        await self.apply(step, fresh=False)
        self.last_closed = StepStatus(step, samples, self.wiring.manifest.target_batch_size, (me,), 0)
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
        ``fresh=False``: the caller has just taken the step's view (``Replicas.step_view``)."""
        started = time.perf_counter()
        try:
            await self._apply(step, fresh=fresh)
        finally:
            self.wiring.timings["averaging"] += time.perf_counter() - started

    async def _apply(self, step: int, *, fresh: bool) -> None:
        policy = self.wiring.policy
        if fresh:
            await self.replicas.step_view()
        await self.replicas.readmit()  # a replica whose ban just ended and that answers is a member, lest it fall behind
        pending = set(range(self.wiring.manifest.num_stages))
        for attempt in range(1, policy.step_attempts + 1):
            plans = {stage: await self._members(stage, step) for stage in sorted(pending)}
            await self._probe(plans, step)
            scheduled = get_dht_time() + policy.averaging_window
            calls = [(stage, peer) for stage, members in plans.items() for peer in members]
            results = await asyncio.gather(*(self._step_call(stage, peer, step, plans[stage], scheduled)
                                             for stage, peer in calls), return_exceptions=True)
            # a stage whose group applied the step with every member summed every member's backwards,
            # also those of a member that failed after its part of the round: those are not replayed
            applied = {stage for (stage, _), result in zip(calls, results)
                       if not isinstance(result, BaseException) and result.group_size == len(plans[stage])}
            for (stage, peer), result in zip(calls, results):
                if not isinstance(result, BaseException):
                    self.replicas.peer_steps[peer] = result.optimizer_step
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
                                  f"in {policy.step_attempts} rounds")
        self.replicas.step = step + 1
        self._forget_open_step()

    async def _step_call(self, stage: StageIndex, peer: PeerId, step: int, members: list[str], scheduled: float) -> StepResponse:
        """One member's step. A member found gone (``trainer.faults.member_gone``) would keep the others
        of its stage waiting for their group until ``peer.averaging_timeout``: they are told to give
        the round up at once (bounded; a member that already finished ignores it)."""
        client = self.wiring.client
        layers = self.wiring.manifest.stages[stage]
        try:
            return await client.step(peer, stage, layers, step, members, scheduled)
        except SwarmError as e:
            if member_gone(e):
                others = [p for p in members if p != peer]
                await asyncio.gather(*(asyncio.wait_for(client.abort(p, stage, layers, step, members), 5.0)
                                       for p in others), return_exceptions=True)
            raise

    async def _members(self, stage: StageIndex, step: int) -> list[str]:
        """The replicas that take part in ``step`` (``trainer.faults.step_members``), or one routed to
        when the stage has none."""
        live = set(self.replicas.live(stage)) | set(self.ledger.get(stage, {}))
        return step_members(live, self.replicas.peer_steps, step) or [await self.replicas.pick(stage)]

    async def _probe(self, plans: dict[int, list[str]], step: int) -> None:
        """Ask the members that hold nothing of ours whether they are alive and current before the
        round: a dead member would keep the others waiting for their group until they time out."""
        holding = {p for by_peer in self.ledger.values() for p in by_peer}
        unknown = sorted({p for members in plans.values() for p in members} - holding)
        stage_of = {p: stage for stage, members in sorted(plans.items(), reverse=True) for p in members}
        window = self.wiring.policy.averaging_window + 5
        infos = await asyncio.gather(*(asyncio.wait_for(self.wiring.client.info(p, stage_of[p]), window)
                                       for p in unknown), return_exceptions=True)
        for peer, info in zip(unknown, infos):
            if isinstance(info, BaseException):
                await self._drop(peer, info)
            elif info.optimizer_step < step:
                self.replicas.peer_steps[peer] = info.optimizer_step
            else:
                continue
            for stage, members in plans.items():
                if peer in members and (len(members) > 1 or isinstance(info, BaseException)):
                    members.remove(peer)
            for stage, members in plans.items():
                if not members:
                    plans[stage] = [await self.replicas.pick(stage)]

    async def _asked(self, stage: StageIndex, peer: PeerId) -> int | None:
        """``peer``'s optimizer step, asked read-only (``info``, bounded); None if it does not answer."""
        try:
            info = await asyncio.wait_for(self.wiring.client.info(peer, stage), self.wiring.policy.averaging_window + 5)
        except (SwarmError, asyncio.TimeoutError):
            return None
        return info.optimizer_step

    async def _left_behind(self, stage: StageIndex, peer: PeerId, step: int, error: BaseException) -> None:
        """The other members of ``stage`` applied ``step`` with this member's gradients in the sum, but
        its own call failed: unless it says it applied the step too, it is behind (or gone). It is left
        out for a while; what it held is in the applied step, so nothing is replayed."""
        where = await self._asked(stage, peer)
        self.replicas.peer_steps[peer] = step if where is None else where
        if where is not None and where > step:
            return
        self.ledger.get(stage, {}).pop(peer, None)
        self.replicas.ban(peer, error)

    async def _step_failed(self, stage: StageIndex, peer: PeerId, step: int, error: BaseException, attempt: int) -> None:
        """A member's step call failed. Its reply may merely have been lost after it applied the step:
        it is asked (read-only) where it stands before it is dropped, lest a live replica that is
        current be banned and the backwards it already applied be replayed elsewhere."""
        if member_gone(error):
            where = await self._asked(stage, peer)
            if where is not None and where > step:
                self.replicas.peer_steps[peer] = where
                return
        verdict = after_step_failure(error)
        if verdict is OnStepFailure.KEEP:  # another member let the group down, not this one
            logger.warning("stage %d, step %d: averaging failed on %s (round %d): %s", stage, step, peer[-8:],
                           attempt, error)
        elif verdict is OnStepFailure.RAISE:
            raise error
        else:
            await self._drop(peer, error)
