"""A serving peer's checkpoints: every ``every`` optimizer steps, a copy of its stage state goes to
its own state dir and to the run's checkpoint stores (another machine: the bootstrap).

Only the copy of the state runs on the compute thread (between two requests, so it is never
half-stepped); writing the files and the upload run beside it. The loop watches the executor's
``optimizer_step`` rather than hooking the optimizer, so how a step is taken (plain AdamW, hivemind
averaging) does not matter here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from peers.state.checkpoint_files import CheckpointDir
from peers.training.executor import StageExecutor
from peers.state.snapshot import StateIdentity, StateMeta, capture_state
from peers.state.store_client import StoreClient

__all__ = ["Checkpointer", "checkpoint_due"]

logger = logging.getLogger(__name__)


def checkpoint_due(step: int, last: int, every: int) -> bool:
    """Whether the stage has crossed a multiple of ``every`` since the checkpoint at step ``last``."""
    return step // every > last // every


class Checkpointer:
    """Checkpoints one executor's stage; ``run`` loops until cancelled."""

    def __init__(
        self,
        executor: StageExecutor,
        identity: StateIdentity,
        *,
        local: CheckpointDir,
        store: StoreClient | None,
        every: int,
        compute: Callable[..., Awaitable],
        poll: float = 0.5,
    ):
        self.executor, self.identity = executor, identity
        self.local, self.store, self.every = local, store, every
        self._compute, self._poll = compute, poll
        self.last_step = executor.optimizer_step  # a restored or downloaded state is already saved elsewhere

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._poll)
            if not checkpoint_due(self.executor.optimizer_step, self.last_step, self.every):
                continue
            try:
                await self.checkpoint()
            except Exception as e:  # a full disk or a lost store must not stop serving; retried next step
                logger.warning("checkpoint of stage %d failed: %s: %s", self.executor.stage, type(e).__name__, e)
                self.last_step = self.executor.optimizer_step

    async def final(self, timeout: float) -> None:
        """On leaving: checkpoint the steps taken since the last checkpoint, so that a stage whose last
        replica leaves in order loses nothing. Bounded by ``timeout``; a failure is only logged."""
        if self.executor.optimizer_step <= self.last_step:
            return
        try:
            await asyncio.wait_for(self.checkpoint(), timeout)
        except Exception as e:  # TimeoutError, an unreachable store, a full disk: leave anyway
            logger.warning("final checkpoint of stage %d failed: %s: %s", self.executor.stage, type(e).__name__, e)

    async def checkpoint(self) -> StateMeta:
        """Save the current state locally, then upload it where no store has it yet."""
        meta, tensors = await self._compute(self._capture)
        await asyncio.to_thread(self.local.save, meta, tensors)
        uploaded = await self.store.put(meta, tensors) if self.store is not None else 0
        # only now: a checkpoint cancelled half-way (the peer leaving) is done again by ``final``
        self.last_step = meta.step
        logger.info("checkpoint of stage %d at step %d saved in %s%s", meta.stage, meta.step, self.local.root,
                    f" and uploaded to {uploaded} store(s)" if uploaded else "")
        return meta

    def _capture(self):
        executor = self.executor
        return capture_state(executor.module, executor.optimizer, identity=self.identity,
                             step=executor.optimizer_step, stage=executor.stage, layers=executor.layers)
