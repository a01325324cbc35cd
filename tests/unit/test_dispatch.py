"""A serving peer's router (``peers.dispatch``): a request is parsed once and handed to the slot of the
stage its parsed model names; a message that does not parse is answered by the first stage's handler;
and the peer's owned background tasks (``TaskSet``) end with it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from peers.dispatch import StageRouter
from peers.training.protocol import INFO
from net.rpc import error_reply
from peers.training.service import StageService
from core.types import LayerRange
from core.loop import TaskSet
from core.errors import SwarmError


def _service(stage: int) -> StageService:
    executor = SimpleNamespace(stage=stage, layers=LayerRange(start=stage, end=stage + 1), optimizer_step=stage * 10,
                               accumulated_samples=0, shutdown=lambda: None)
    return StageService(executor, "QmPeer")


def _router(stages: list[int], *, moving: bool = False) -> StageRouter:
    slots = {stage: SimpleNamespace(stage=stage, service=_service(stage), inference=None) for stage in stages}
    host = SimpleNamespace(slots=slots, hosted={}, moving=moving, peer_id="QmPeer", span=f"stages {stages}")
    return StageRouter(host)


class _Recording:
    """A transport that keeps what is registered on it."""

    def __init__(self) -> None:
        self.handlers: dict = {}

    async def serve(self, method: str, handler, **options) -> None:
        self.handlers[method] = handler


def _info_handler(router: StageRouter):
    transport = _Recording()
    asyncio.run(router.register(transport))
    return transport.handlers[INFO]


def _info(router: StageRouter, message: object) -> dict:
    """The reply the caller gets (a refusal raised by the router is answered by the transport)."""
    try:
        reply, _ = asyncio.run(_info_handler(router)(message, []))
    except SwarmError as e:
        return error_reply(e)
    return reply


@pytest.mark.parametrize("message, answered_by, error", [
    ({"stage": 3}, 3, None),  # routed by the parsed stage
    ({}, 2, None),  # no stage: the first stage answers
    ({"stage": "three"}, None, "BadRequest"),  # does not parse: the first stage names the error
    ({"stage": 3, "extra": 1}, None, "BadRequest"),
    ("garbage", None, "BadRequest"),
    ({"stage": 7}, None, "WrongStage"),  # parses, but this peer serves 2..3
])
def test_a_request_goes_to_the_stage_its_parsed_model_names(message, answered_by, error):
    router = _router([2, 3])
    reply = _info(router, message)
    if error is None:
        assert reply["ok"]["stage"] == answered_by
    else:
        assert reply["error"]["code"] == error
        first, second = (slot.service for slot in router.host.slots.values())
        assert (first.errors_replied, second.errors_replied) == (1, 0), "refusals count with the first stage"


def test_a_peer_that_moves_refuses_a_stage_it_is_not_serving_yet_as_unavailable():
    router = _router([2, 3], moving=True)
    assert _info(router, {"stage": 3})["ok"]["stage"] == 3, "a kept stage serves on while the peer moves"
    refused = _info(router, {"stage": 4})["error"]
    assert refused["code"] == "PeerUnavailable" and "is loading" in refused["message"]


def test_requests_in_flight_are_counted_per_stage_for_draining():
    router = _router([2, 3])

    async def run() -> tuple[int, int, float]:
        release = asyncio.Event()
        service = router.host.slots[3].service
        original = service.rpc_info

        async def slow_info(request, tensors):
            await release.wait()
            return await original(request, tensors)

        service.rpc_info = slow_info
        transport = _Recording()
        await router.register(transport)
        call = asyncio.create_task(transport.handlers[INFO]({"stage": 3}, []))
        await asyncio.sleep(0.01)
        busy = router.in_flight([3]), router.in_flight([2])
        release.set()
        await call
        return (*busy, router.idle_seconds([3]))

    busy_3, busy_2, idle = asyncio.run(run())
    assert (busy_3, busy_2) == (1, 0) and idle < 1.0
    assert router.in_flight([2, 3]) == 0


def test_a_task_set_cancels_and_awaits_every_task_and_takes_none_after_closing():
    async def run() -> tuple[list[bool], int]:
        tasks = TaskSet()
        ended: list[bool] = []

        async def forever() -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                ended.append(True)

        for n in range(3):
            tasks.spawn(forever(), name=f"loop-{n}")
        tasks.spawn(asyncio.sleep(0), name="short")
        await asyncio.sleep(0.01)
        left = len(tasks)
        await tasks.close()
        await tasks.close()  # idempotent
        with pytest.raises(RuntimeError, match="stopping"):
            tasks.spawn(forever(), name="late")
        return ended, left

    ended, left = asyncio.run(run())
    assert left == 3, "a task that ended leaves the set"
    assert ended == [True] * 3, "close waits until every task has ended"
