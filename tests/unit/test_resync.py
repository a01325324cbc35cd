"""A replica that fell behind while alive resyncs: the pure decision (table) and the watch over the
in-memory transport taking the state of the replica ahead."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dht.schemas import OptimizerSettings, PeerRecord, PeerState
from peers.training.client import StageClient
from peers.training.executor import StageExecutor
from peers.state.resync import ResyncWatch, falls_behind
from peers.training.service import StageService
from peers.state.snapshot import StateIdentity
from net.transport import InMemoryTransport
from shards.stage import load_stage
from core.types import LayerRange

ID = StateIdentity(run_id="run", config_hash="c0ffee")
LAYERS = LayerRange(start=0, end=2)


@pytest.mark.parametrize("mine, others, behind_at, expected", [
    (3, [], None, False),        # alone: nobody to be behind
    (3, [3, 3], None, False),    # in step with the others
    (3, [4], None, False),       # ahead once: maybe mid-step, look again
    (3, [4], 3, True),           # still behind at the same step: resync
    (4, [5], 3, False),          # it stepped meanwhile: catching up on its own
    (3, [2, 4], 3, True),        # the replica furthest ahead counts
    (5, [4], 5, False),          # ahead of the others: never resync backwards
])
def test_falls_behind(mine, others, behind_at, expected):
    assert falls_behind(mine, others, behind_at) is expected


def _train(executor: StageExecutor, seed: int) -> None:
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(seed))
    executor.module(hidden).pow(2).mean().backward()
    executor.optimizer.step()
    executor.optimizer.zero_grad()
    executor.optimizer_step += 1


def test_a_replica_left_behind_takes_the_state_of_the_one_ahead(model_factory):
    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32, num_heads=4)
    ahead, behind = (StageExecutor(load_stage(str(model_dir), LAYERS), 0, LAYERS, OptimizerSettings(lr=1e-2))
                     for _ in range(2))
    for seed in range(3):
        _train(ahead, seed)
    _train(behind, 99)  # one step of its own, then it missed the others
    behind.module(torch.randn(2, 5, 32)).sum().backward()  # stale gradients of a step long gone
    behind.accumulated_samples = 2

    async def scenario() -> tuple[list[int], list[int]]:
        hub = InMemoryTransport()
        await StageService(ahead, "ahead", identity=ID).register(hub.bind("ahead"))

        async def records(stage: int) -> list[PeerRecord]:
            return [PeerRecord(peer_id=peer, stage=stage, layers=LAYERS, state=PeerState.ONLINE, step=e.optimizer_step)
                    for peer, e in (("ahead", ahead), ("behind", behind))]

        async def compute(fn, *args):
            return fn(*args)

        watch = ResyncWatch(records, lambda: [(behind, compute)], StageClient(hub.bind("behind")), ID, "behind")
        return await watch.check_once(), await watch.check_once()

    first, second = asyncio.run(scenario())
    assert first == [] and second == [0]
    assert behind.optimizer_step == ahead.optimizer_step == 3 and behind.accumulated_samples == 0
    for a, b in zip(ahead.module.parameters(), behind.module.parameters()):
        assert torch.equal(a, b) and b.grad is None
    for a, b in zip(ahead.optimizer.state.values(), behind.optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
