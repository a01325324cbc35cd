"""Where an averager runs: by default on a thread of the caller's process (no averager process, which
is what an idle peer's memory needs, issue 27), with hivemind's child process kept as the fallback
(``in_process=False``, ``peer.averager_process``). Both sum over real hivemind DHTs and p2pd on loopback,
hand over shared state, and stop without leaving a thread or a process behind; a shut-down averager
refuses a round with a clear error instead of hanging."""

from __future__ import annotations

import multiprocessing
import threading

import hivemind
import pytest
import torch
from hivemind.utils import get_dht_time

from core.errors import AveragingFailed
from peers.training.averaging import HivemindGradientSync

pytestmark = pytest.mark.slow

GRADS = [torch.randn(3000, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def _averager_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("averager-")]


def _round(syncs: list[HivemindGradientSync], members: list[str], step: int) -> list[object]:
    results: dict[str, object] = {}
    scheduled = get_dht_time() + 1.0

    def member(sync: HivemindGradientSync, me: str, grad: torch.Tensor) -> None:
        try:
            results[me] = sync.sum([grad], step=step, members=members, me=me, scheduled_time=scheduled, timeout=20)[0]
        except BaseException as e:  # asserted by the caller
            results[me] = e

    threads = [threading.Thread(target=member, args=args) for args in zip(syncs, members, GRADS)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    return [results.get(m) for m in members]


@pytest.mark.parametrize("in_process", [True, False], ids=["thread", "child-process"])
def test_an_averager_sums_shares_state_and_stops_cleanly(in_process):
    first = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    dhts = [first, hivemind.DHT(initial_peers=first.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                start=True)]
    syncs: list[HivemindGradientSync] = []
    try:
        syncs = [HivemindGradientSync(d, "where_test", [torch.zeros(3000)], in_process=in_process) for d in dhts]
        children = {p.name for p in multiprocessing.active_children()}
        assert len(children) == (2 if in_process else 4), children  # the DHTs (and, as a fallback, the averagers)
        assert len(_averager_threads()) == (2 if in_process else 0), _averager_threads()
        members = [d.peer_id.to_base58() for d in dhts]
        for step in range(2):
            sums = _round(syncs, members, step)
            for got in sums:
                assert isinstance(got, torch.Tensor), got
                assert torch.allclose(got, GRADS[0] + GRADS[1], atol=1e-5)
        syncs[0].share_state(lambda: ({"step": 7}, [torch.arange(5.0)]))
        loaded = None
        for _ in range(20):  # the first member's announcement reaches the DHT within a moment
            loaded = syncs[1].load_state(timeout=10)
            if loaded is not None:
                break
        assert loaded is not None
        metadata, tensors = loaded
        assert metadata == {"step": 7} and torch.equal(tensors[0], torch.arange(5.0))
    finally:
        for sync in syncs:
            sync.shutdown()
    try:
        assert _averager_threads() == []
        assert len(multiprocessing.active_children()) == 2  # only the DHTs
        if in_process:
            with pytest.raises(AveragingFailed, match="shut down"):
                syncs[0].sum([GRADS[0]], step=9, members=members, me=members[0], scheduled_time=get_dht_time(),
                             timeout=5)
    finally:
        for d in dhts:
            d.shutdown()
