"""A trainer alone in the run applies a step it closes at once and publishes its commit afterwards
(``RemotePipeline.commit``): the step's DHT round trips leave its critical path, training is unchanged,
and a second trainer showing up puts commits back before the steps."""

from __future__ import annotations

import asyncio
import time

import torch

from trainer.steps import LocalCoordinator, StepStatus
from tests.helpers import reference_losses
from tests.unit.test_fault_tolerance import LR, ReplicatedSwarm, _assert_close_losses, _batches, _train_step


class SlowCoordinator(LocalCoordinator):
    """A lone trainer's coordinator whose commits take ``delay`` s, as DHT round trips on a WAN do;
    ``others`` other trainers are online from the moment it is set."""

    defer_commits = True

    def __init__(self, target: int, delay: float):
        super().__init__(target)
        self.delay, self.others = delay, 0
        self.log: list[tuple[str, int, float]] = []  # (what, step, when)

    async def commit(self, step: int, samples: int) -> StepStatus:
        self.log.append(("commit", step, time.monotonic()))
        await asyncio.sleep(self.delay)
        status = await super().commit(step, samples)
        return StepStatus(status.step, status.samples, status.target, status.trainers, 0, self.others)

    async def finished(self, step: int) -> None:
        self.log.append(("finished", step, time.monotonic()))
        await super().finished(step)


def test_a_lone_trainer_applies_its_step_before_publishing_it_and_trains_the_same(model_factory):
    model_dir = model_factory("llama", num_layers=4, hidden_size=32, num_kv_heads=2)
    swarm = ReplicatedSwarm(model_dir, [1, 1], push=True)
    coordinator = swarm.pipeline.coordinator = SlowCoordinator(swarm.manifest.target_batch_size, delay=0.3)
    try:
        batches = _batches(5, swarm.source.config.vocab_size)
        optimizer = torch.optim.AdamW(swarm.local.parameters(), lr=LR)

        async def train():
            losses, commit_seconds = [], []
            for i, ids in enumerate(batches):
                if i == 3:
                    coordinator.others = 1  # another trainer joins: its next read sees it
                began = time.monotonic()
                losses.append(await _train_step(swarm.pipeline, swarm.local, optimizer, ids, pipelined=True))
                commit_seconds.append(time.monotonic() - began)
            await swarm.pipeline.settle()
            return losses, commit_seconds

        losses, seconds = asyncio.run(train())
        _assert_close_losses(losses, reference_losses(model_dir, batches, lr=LR))
        assert [swarm.services[p].executor.optimizer_step for p in ("s0a", "s1a")] == [5, 5]
        # every step was committed and finished, in order, each exactly once
        assert [(what, step) for what, step, _ in coordinator.log] == [
            (what, step) for step in range(5) for what in ("commit", "finished")]
        # step 0: nothing known yet, committed first; steps 1-3: alone, the 0.3 s commit is off the step's
        # path (the next step waits for it only if it is still running); step 3's read sees the newcomer,
        # so step 4 commits before it applies
        assert seconds[0] >= 0.3 and seconds[4] >= 0.3
        assert min(seconds[1:4]) < seconds[0]
        assert not swarm.pipeline.steps._alone
    finally:
        swarm.close()
