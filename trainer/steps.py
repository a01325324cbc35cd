"""When does a collaborative step close? The trainers' side of the step counter.

Every trainer counts the sequences it has pushed through the swarm since the last step and commits
that count. The run's step ``s`` closes when the trainers' commits to ``s`` reach the manifest's
``target_batch_size`` (the hivemind ``Optimizer`` notion of an epoch); then every trainer that took
part asks the stages to apply it (``RemotePipeline.apply``: idempotent on the peers).

``LocalCoordinator`` serves a lone trainer without the DHT (and unit tests); ``DHTCoordinator`` keeps
each trainer's commit in its ``TrainerRecord`` under ``{run}_trainers``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from hivemind.utils import get_dht_time

from dht.records import SwarmDHT
from dht.schemas import TrainerRecord

__all__ = ["StepStatus", "StepCoordinator", "LocalCoordinator", "DHTCoordinator", "wait_until_closed"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStatus:
    """What the trainers have committed to step ``step`` so far."""

    step: int
    samples: int
    target: int
    trainers: tuple[str, ...]  # the trainers with sequences in this step
    others_working: int  # other live trainers still on this step (they may commit more)
    others_online: int = 0  # other live trainers, on any step

    @property
    def alone(self) -> bool:
        """No other trainer is in the run (as far as this read saw)."""
        return self.others_online == 0 and self.others_working == 0 and len(self.trainers) <= 1

    @property
    def closed(self) -> bool:
        return self.samples >= self.target


class StepCoordinator(Protocol):
    me: str
    defer_commits: bool  # a lone trainer publishes its commits after applying the step (they are slow)

    async def commit(self, step: int, samples: int) -> StepStatus:
        """Record that this trainer has contributed ``samples`` sequences to ``step`` in all."""
        ...

    async def status(self, step: int) -> StepStatus: ...

    async def finished(self, step: int) -> None:
        """This trainer has seen ``step`` applied and moves on to the next."""
        ...


class LocalCoordinator:
    """A lone trainer: the step closes when its own sequences reach the target."""

    defer_commits = False  # in memory: nothing to gain

    def __init__(self, target: int, me: str = "trainer"):
        self.target, self.me = target, me
        self._samples: dict[int, int] = {}

    async def commit(self, step: int, samples: int) -> StepStatus:
        self._samples[step] = samples
        return await self.status(step)

    async def status(self, step: int) -> StepStatus:
        samples = self._samples.get(step, 0)
        return StepStatus(step, samples, self.target, (self.me,) if samples else (), 0)

    async def finished(self, step: int) -> None:
        self._samples.pop(step, None)


class DHTCoordinator:
    """Trainers that meet in the DHT: each one's ``TrainerRecord`` says what it gave which step."""

    defer_commits = True  # each commit is DHT round trips (``RemotePipeline.commit``)

    def __init__(self, dht: SwarmDHT, target: int, me: str):
        self.dht, self.target, self.me = dht, target, me
        self._record = TrainerRecord(trainer_id=me)
        self._writing: asyncio.Task | None = None  # the last record write, finished in the background

    async def commit(self, step: int, samples: int) -> StepStatus:
        """Publish our samples and read the others' at once: the status counts our own record from
        memory, so neither waits for the other (each is a DHT round trip, tens of ms on a WAN)."""
        _, status = await asyncio.gather(self._publish(step=step, samples=samples), self.status(step))
        return status

    async def status(self, step: int) -> StepStatus:
        records = {r.trainer_id: r for r in await self.dht.trainer_records() if r.online}
        records[self.me] = self._record  # our own view is the freshest
        counts = {tid: r.samples_in(step) for tid, r in records.items()}
        working = sum(1 for tid, r in records.items() if tid != self.me and r.step == step)
        trainers = tuple(sorted(tid for tid, n in counts.items() if n > 0))
        return StepStatus(step, sum(counts.values()), self.target, trainers, working, len(records) - 1)

    async def finished(self, step: int) -> None:
        """Announce the next step without waiting for the DHT: the write goes on while the next batch
        computes (the next publish waits for it, so records land in order)."""
        done = self._record.samples_in(step)
        self._record = self._next_record(step=step + 1, samples=0, prev_step=step, prev_samples=done)
        self._writing = asyncio.create_task(self._write(self._record, after=self._writing), name="trainer-record")

    async def start(self, step: int) -> None:
        """Announce this trainer (working on ``step``) before its first batch."""
        await self._publish(step=step, samples=0)

    async def refresh(self) -> None:
        await self._publish()

    async def leave(self) -> None:
        await self._publish(online=False)

    async def _publish(self, **update) -> None:
        self._record = self._next_record(**update)
        await self._write(self._record, after=self._writing)

    def _next_record(self, **update) -> TrainerRecord:
        return self._record.model_copy(update={**update, "updated": get_dht_time()})

    async def _write(self, record: TrainerRecord, *, after: asyncio.Task | None) -> None:
        if after is not None:
            await asyncio.gather(after, return_exceptions=True)  # an older record must not land last
        if not await self.dht.announce_trainer(record):
            logger.warning("the DHT did not store this trainer's progress record")


async def wait_until_closed(coordinator: StepCoordinator, status: StepStatus, *, batch: int,
                            timeout: float) -> StepStatus:
    """Wait (bounded) for the other trainers on this step when their next batches (taken to be as
    large as ours, ``batch``) would close it. Otherwise return at once and accumulate on: a lone
    trainer whose batch is smaller than the target, or a run whose target needs more batches."""

    def others_would_close(s: StepStatus) -> bool:
        return not s.closed and s.others_working > 0 and s.samples + s.others_working * batch >= s.target

    deadline = time.monotonic() + timeout
    delay, attempt = 0.05, 0
    while others_would_close(status) and time.monotonic() < deadline:
        attempt += 1
        if attempt == 1 or attempt % 20 == 0:
            logger.info("step %d: %d/%d sequences; waiting for %d other trainer(s) (attempt %d)", status.step,
                        status.samples, status.target, status.others_working, attempt)
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.5)
        status = await coordinator.status(status.step)
    if others_would_close(status):
        logger.warning("step %d: other trainers did not finish it within %.0f s; going on alone", status.step, timeout)
    return status
