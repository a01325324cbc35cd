"""Routes and steps read the DHT off the critical path (issue 27, point 3): the view of the records
in hand is used while a read runs in the background; a peer that failed makes the next use wait for a
fresh read; ``cached=False`` waits for every read, as before."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dht.schemas import Manifest, PeerRecord, PeerState
from peers.training.client import StageClient
from net.transport import InMemoryTransport
from shards import stage_boundaries
from trainer.pipeline import RemotePipeline

LAYERS = stage_boundaries(4, 2)
MANIFEST = Manifest(run_id="unit", model="m", config_hash="h", num_layers=4, stages=LAYERS)


def _record(peer: str, stage: int) -> PeerRecord:
    return PeerRecord(peer_id=peer, stage=stage, layers=LAYERS[stage], state=PeerState.ONLINE)


class SlowSource:
    """Records whose read takes ``delay`` s; each read sees the peers of ``self.peers`` at that moment."""

    def __init__(self, delay: float):
        self.delay, self.reads, self.fail = delay, 0, False
        self.peers = {0: ["a"], 1: ["b"]}

    async def __call__(self):
        self.reads += 1
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionError("the DHT did not answer")
        return {stage: [_record(p, stage) for p in peers] for stage, peers in self.peers.items()}


def _replicas(source: SlowSource, *, cached: bool = True, route_ttl: float = 10.0):
    pipeline = RemotePipeline(MANIFEST, StageClient(InMemoryTransport(), timeout=1), source, route_ttl=route_ttl,
                              cached_routes=cached)
    return pipeline.replicas


async def _timed(coro) -> tuple[object, float]:
    loop = asyncio.get_running_loop()
    began = loop.time()
    result = await coro
    return result, loop.time() - began


@pytest.mark.parametrize("cached, waits_at_step", [
    (True, False),  # the step uses the view in hand; the newcomers are in the next step's view
    (False, True),  # uncached: the step waits for the read and sees the newcomers at once
])
def test_a_step_waits_for_the_dht_only_when_uncached(cached, waits_at_step):
    source = SlowSource(delay=0.2)
    replicas = _replicas(source, cached=cached)

    async def scenario():
        await replicas.current()  # the first view is always waited for
        source.peers = {0: ["a"], 1: ["c", "d"]}  # b left, d joined
        step_view, seconds = await _timed(replicas.step_view())
        during = sorted(r.peer_id for r in step_view[1] if r.peer_id != "b")
        await asyncio.sleep(0.3)  # the background read, if any, has landed
        after = sorted(replicas.live(1))
        await replicas.close()
        return seconds, during, after

    seconds, during, after = asyncio.run(scenario())
    assert (seconds >= 0.2) is waits_at_step
    assert during == (["c", "d"] if waits_at_step else [])
    assert [p for p in after if p in ("c", "d")] == ["c", "d"]  # both see both once the read is done
    assert source.reads == 2


def test_an_expired_view_is_used_while_it_is_read_again_in_the_background():
    source = SlowSource(delay=0.2)
    replicas = _replicas(source, route_ttl=0.05)

    async def scenario():
        await replicas.current()
        await asyncio.sleep(0.1)  # the view has expired
        _, seconds = await _timed(replicas.current())
        _, again = await _timed(replicas.current())  # a read is under way: no second one
        await asyncio.sleep(0.3)
        return seconds, again

    seconds, again = asyncio.run(scenario())
    assert seconds < 0.1 and again < 0.1
    assert source.reads == 2 and replicas.background_reads == 1
    assert replicas.wiring.timings["dht"] >= 0.2  # only the first, waited-for read counts


def test_a_peer_that_failed_makes_the_next_use_wait_for_a_fresh_read():
    source = SlowSource(delay=0.2)
    replicas = _replicas(source)

    async def scenario():
        await replicas.current()
        source.peers = {0: ["a"], 1: ["c"]}  # b died, c took its stage over
        replicas.ban("b", ConnectionError("b is gone"))
        view, seconds = await _timed(replicas.current())
        _, cached = await _timed(replicas.current())
        return view, seconds, cached

    view, seconds, cached = asyncio.run(scenario())
    assert seconds >= 0.2 and cached < 0.1  # one fresh read after the failure, then the cache again
    assert [r.peer_id for r in view[1] if r.peer_id != "b"] == ["c"]
    assert replicas.live(1) == ["c"]


def test_a_background_read_that_fails_keeps_the_view_and_says_so(caplog):
    source = SlowSource(delay=0.05)
    replicas = _replicas(source)

    async def scenario():
        first = await replicas.current()
        source.fail = True
        with caplog.at_level(logging.WARNING, logger="trainer.replicas"):
            view = await replicas.step_view()
            await asyncio.sleep(0.15)
        return first, view

    first, view = asyncio.run(scenario())
    assert view == first and replicas.live(0) == ["a"] and replicas.background_reads == 0
    assert "in the background failed: ConnectionError: the DHT did not answer" in caplog.text


def test_close_cancels_a_background_read():
    source = SlowSource(delay=5.0)
    replicas = _replicas(source)

    async def scenario():
        replicas.records, replicas._records_time = {0: [_record("a", 0)]}, 0.0  # an old view in hand
        await replicas.current()
        await asyncio.sleep(0.05)  # the read is under way
        _, seconds = await _timed(replicas.close())
        return seconds

    assert asyncio.run(scenario()) < 1.0
    assert source.reads == 1 and replicas.background_reads == 0
