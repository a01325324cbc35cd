"""``StageSlot``: one stage a serving peer holds, with its own compute thread, service, averager,
generation sessions and checkpoints (``peers.hosting`` keeps the slots)."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import torch

from dht.schemas import PeerRecord
from peers.training.averaging import HivemindGradientSync
from peers.state.checkpoints import Checkpointer
from peers.inference.service import InferenceService
from peers.training.protocol import BackwardRequest, ForwardRequest
from peers.training.service import StageService
from peers.training.worker import DEFAULT_QUEUE_SIZE, ComputeWorker, on_thread
from core.loop import bounded, cancel_and_wait, off_loop
from core.types import StageIndex

__all__ = ["StageSlot", "WorkHook"]

WorkHook = Callable[[str, ForwardRequest | BackwardRequest, list[torch.Tensor], dict, list[torch.Tensor]],
                    Awaitable[None]]
"""``hook(method, request, tensors, reply, out)`` after a hosted stage answered a forward or backward."""

SLOT_STOP = 30.0  # s each part of a slot's stop (its averager, its compute thread) may take before it is left behind



@dataclass
class StageSlot:
    """One stage this peer serves: what it announces, and (once loaded) its service, averager and
    checkpoints. A slot without a service is loading.

    Each slot has its own compute thread: a stage's requests run one at a time on it (no locks around
    the module and optimizer), and a step that waits for its replicas to average holds up only its own
    stage. On one shared thread, two peers serving stages 2..3 that took the two step calls in
    opposite orders would each wait for the other's averaging until the timeout."""

    stage: StageIndex
    record: PeerRecord
    service: StageService | None = None
    inference: InferenceService | None = None  # generation sessions (KV caches) on this stage's layers
    sync: HivemindGradientSync | None = None
    checkpointer: Checkpointer | None = None
    checkpoint_task: asyncio.Task | None = None
    worker: Executor | None = None
    on_work: WorkHook | None = None  # a stage hosted for a delegator: told of every forward/backward done
    queue_size: int = DEFAULT_QUEUE_SIZE

    def __post_init__(self) -> None:
        if self.worker is None:
            self.worker = ComputeWorker(f"stage{self.stage}", queue_size=self.queue_size)

    async def run(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` on this stage's compute thread."""
        return await on_thread(self.worker, fn, *args)

    async def stop_checkpoints(self) -> None:
        await cancel_and_wait(self.checkpoint_task)

    async def close(self) -> None:
        """Stop its checkpoints and generation sessions, release its executor and averager (the service owns the averager once
        it exists) and its thread."""
        await self.stop_checkpoints()
        if self.inference is not None:  # open sessions end with the stage; their clients re-open elsewhere
            await self.inference.stop()
        # off the event loop and bounded: the averager's own stop is bounded by its shutdown timeout,
        # and a job running on the compute thread (a step waiting for its round) ends with it
        shutdown = self.service.shutdown if self.service is not None else self.sync.shutdown if self.sync else None
        if shutdown is not None:
            await bounded(off_loop(shutdown), SLOT_STOP, f"stage {self.stage}'s averager")
        await bounded(off_loop(self.worker.shutdown, wait=True, cancel_futures=True), SLOT_STOP,
                      f"stage {self.stage}'s compute thread")
