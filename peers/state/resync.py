"""A replica that fell behind while alive takes the current state again.

A replica misses a collaborative step when the trainer leaves it out of that step's members (it was
banned for a failure it survived, or its step reply was lost and it did not answer the ``info`` that
followed). It is alive and serving, its DHT record tells its optimizer step, and trainers skip it from
then on (``StaleReplica``): without help it would stay useless until restarted.

``ResyncWatch`` compares, every ``period`` s (``RESYNC_PERIOD``), the optimizer step of each stage this
peer serves with the steps its stage's other online replicas answer (``info``; their records' steps
are up to ``RECORD_REFRESH`` s old). Behind on two checks in a row without having stepped
in between (a replica merely mid-step catches up by itself), it downloads the state of the replica
furthest ahead (``peers.state.recovery.take_state``, on the compute thread, re-fetched if that replica steps
meanwhile), and serves on from the run's step.

A replica whose averaging round of a step failed (``AveragingFailed``: a lost part, a timeout) does
not wait for that: the others may have applied the step. ``nudge(stage)`` asks the stage's other
online replicas their step at once (``info``, not their records, which are up to ``RECORD_REFRESH``
s old), a few times over a few seconds while the others finish the round; if one is ahead, this
replica marks itself ``behind`` (it refuses forwards, backwards and state downloads with
``StaleReplica``, so trainers, newcomers and export go elsewhere) and takes its state.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Sequence

from dht.schemas import PeerRecord, PeerState
from peers.training.client import StageClient
from peers.training.executor import StageExecutor
from peers.state.recovery import Compute, take_state
from peers.state.snapshot import StateIdentity
from core.loop import cancel_and_wait
from core.errors import SwarmError
from core.types import StageIndex

__all__ = ["falls_behind", "ResyncWatch", "RESYNC_PERIOD"]

RESYNC_PERIOD = 5.0  # seconds between looks: a replica that missed steps is found within two

logger = logging.getLogger(__name__)


def falls_behind(mine: int, others: Sequence[int], behind_at: int | None) -> bool:
    """Pure: another replica is ahead of ``mine`` now, and was already ahead at the last check, when
    this replica was at the same step (``behind_at``: this replica's step then, None if it was not
    behind)."""
    return bool(others) and max(others) > mine and behind_at == mine


class ResyncWatch:
    """Watches the stages this peer serves (``current()``) and resyncs any that fell behind."""

    def __init__(self, records: Callable[[int], Awaitable[list[PeerRecord]]],
                 current: Callable[[], Sequence[tuple[StageExecutor, Compute]]], client: StageClient,
                 identity: StateIdentity, me: str, *, period: float = RESYNC_PERIOD):
        """``current()``: each served stage's executor with the function that runs a call on that
        stage's compute thread."""
        self._records, self._current, self._client = records, current, client
        self._identity, self._me, self._period = identity, me, period
        self._behind_at: dict[int, int] = {}
        self.resyncs = 0
        self._task: asyncio.Task | None = None
        self._nudged: dict[int, asyncio.Task] = {}

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._forever(), name="replica-resync")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        for task in list(self._nudged.values()):
            await cancel_and_wait(task)
        self._nudged.clear()

    def nudge(self, stage: StageIndex) -> None:
        """``stage``'s step round failed here: check now whether the other replicas applied it (one check
        per stage at a time)."""
        task = self._nudged.get(stage)
        if task is None or task.done():
            self._nudged[stage] = asyncio.create_task(self._catch_up_safely(stage), name=f"resync-stage{stage}")

    async def _catch_up_safely(self, stage: StageIndex) -> bool:
        try:
            return await self._catch_up(stage)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a DHT hiccup (or the node stopping) must not fail stop(); the watch retries
            logger.warning("stage %d: checking its replicas' steps failed: %s: %s", stage, type(e).__name__, e)
            return False

    async def _catch_up(self, stage: StageIndex, looks: int = 5) -> bool:
        """Up to ``looks`` times, 0.5 s more apart each time: is another replica ahead of this one? If so,
        take its state (marked ``behind`` meanwhile). False when none got ahead (the round failed for
        every member, and the trainer runs it again)."""
        for look in range(1, looks + 1):
            await asyncio.sleep(0.5 * look)
            served = [(e, c) for e, c in self._current() if e.stage == stage]
            if not served:
                return False
            executor, compute = served[0]
            steps = await self._steps_now(executor)
            mine = executor.optimizer_step
            if not steps or max(steps.values()) <= mine:
                continue
            ahead = max(steps, key=steps.__getitem__)
            logger.warning("stage %d: its averaging round failed here and replica %s applied the step (at %d, "
                           "this one at %d): taking its state now", stage, ahead[-8:], steps[ahead], mine)
            executor.behind = True
            try:
                step = await take_state(executor, self._identity, ahead, self._client, compute)
            except SwarmError as e:
                logger.warning("stage %d: taking replica %s's state failed (%s); the periodic check retries",
                               stage, ahead[-8:], e)
                return False
            finally:
                executor.behind = False
            self.resyncs += 1
            logger.info("stage %d resynced to step %d from replica %s", stage, step, ahead[-8:])
            return True
        return False

    async def _steps_now(self, executor: StageExecutor) -> dict[str, int]:
        """What each other online replica of the stage answers as its optimizer step now."""
        records = await self._records(executor.stage)
        steps = {}
        for record in records:
            if record.state != PeerState.ONLINE or record.peer_id == self._me or record.layers != executor.layers:
                continue
            try:
                steps[record.peer_id] = (await self._client.info(record.peer_id, executor.stage)).optimizer_step
            except SwarmError:
                continue  # gone or busy: the others decide
        return steps

    async def check_once(self) -> list[int]:
        """One look at every served stage; returns the stages that were resynced."""
        done = []
        for executor, compute in self._current():
            try:
                if await self._check(executor, compute):
                    done.append(executor.stage)
            except SwarmError as e:  # no replica handed its state over: try again next period
                logger.warning("stage %d is behind its replicas and resyncing failed: %s", executor.stage, e)
        return done

    async def _check(self, executor: StageExecutor, compute: Compute) -> bool:
        others = await self._steps_now(executor)  # asked, not read from records up to RECORD_REFRESH s old
        mine = executor.optimizer_step
        if not falls_behind(mine, list(others.values()), self._behind_at.get(executor.stage)):
            if others and max(others.values()) > mine:
                self._behind_at[executor.stage] = mine
            else:
                self._behind_at.pop(executor.stage, None)
            return False
        ahead = max(others, key=others.__getitem__)
        logger.warning("stage %d here is at step %d, replica %s at step %d: taking its state", executor.stage,
                       mine, ahead[-8:], others[ahead])
        executor.behind = True
        try:
            step = await take_state(executor, self._identity, ahead, self._client, compute)
        finally:
            executor.behind = False
        self._behind_at.pop(executor.stage, None)
        self.resyncs += 1
        logger.info("stage %d resynced to step %d from replica %s", executor.stage, step, ahead[-8:])
        return True

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(self._period)
            try:
                await self.check_once()
            except Exception as e:  # a DHT hiccup must not stop the watch; the next period retries
                logger.warning("checking whether this replica fell behind failed: %s", e)
