"""The DHT served on a thread of the caller's process (the default, issue 27 point 6) does what hivemind's
child process did for it: each node's p2pd gets that node's relay flags alone, sits in a process group
of its own (Ctrl+C in a terminal reaches the caller only), dies with the caller killed by SIGKILL, and a
node whose p2pd died reports itself gone and stops at once; a node whose shutdown hangs is bounded."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
from hivemind.utils import MPFuture, get_dht_time

from dht.calls import unbind_idle
from dht.records import SwarmDHT

pytestmark = pytest.mark.slow


def _dht_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "dht"]


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


def test_nodes_on_threads_have_their_own_daemons_and_stop_cleanly():
    relay = SwarmDHT.create("thr", relay=True, relay_limits=(7, 3, 1 << 26))
    plain = SwarmDHT.create("thr", initial_peers=relay.visible_maddrs())
    try:
        assert multiprocessing.active_children() == []
        assert _dht_threads() == ["dht", "dht"]
        daemons = [psutil.Process(node.dht.daemon_pid) for node in (relay, plain)]
        assert [d.ppid() for d in daemons] == [os.getpid(), os.getpid()]
        assert all(os.getpgid(d.pid) == d.pid != os.getpgid(0) for d in daemons)  # groups of their own
        assert "-relayMaxReservations=7" in daemons[0].cmdline() and "-relayMaxCircuits=3" in daemons[0].cmdline()
        assert not any(arg.startswith("-relayMax") for arg in daemons[1].cmdline())

        async def scenario() -> object:  # the caller's loop awaits the futures the DHT's thread sets
            assert await relay.dht.store("k", 5, get_dht_time() + 30, return_future=True)
            return await plain.dht.get("k", return_future=True)

        assert asyncio.run(scenario()).value == 5
        assert plain.dht.get("k").value == 5  # and a thread with no loop running waits with result()
    finally:
        plain.shutdown()
        relay.shutdown()
    assert _dht_threads() == []
    assert all(_gone(d.pid, 5) for d in daemons)
    assert not relay.dht.is_alive()
    relay.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="the DHT is shut down"):
        relay.dht.get("k")


def test_a_node_whose_daemon_died_is_gone_and_stops_at_once():
    node = SwarmDHT.create("thr")
    try:
        assert node.dht.is_alive()
        os.kill(node.dht.daemon_pid, 9)
        deadline = time.monotonic() + 5
        while node.dht.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not node.dht.is_alive()
        started = time.monotonic()
    finally:
        node.shutdown()
    assert time.monotonic() - started < 1.0  # it does not wait on the dead daemon's socket
    assert _dht_threads() == []


def test_a_hanging_shutdown_is_bounded_and_named(caplog):
    node = SwarmDHT.create("thr")
    pid = node.dht.daemon_pid
    node.dht.shutdown_timeout = 0.5

    async def hang() -> None:
        await asyncio.sleep(60)

    node.dht._node.shutdown = hang
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="dht.records"):
        node.shutdown()
    assert time.monotonic() - started < 5
    assert "the DHT node did not shut down within 0.5 s" in caplog.text
    assert _dht_threads() == [] and _gone(pid, 5)


def test_a_killed_caller_leaves_no_daemon(tmp_path):
    script = textwrap.dedent("""
        import sys, time
        from dht.records import SwarmDHT
        node = SwarmDHT.create("thr", relay=True)
        print(node.dht.daemon_pid, flush=True)
        time.sleep(600)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    caller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        daemon = int(caller.stdout.readline())
        assert psutil.Process(daemon).ppid() == caller.pid
    finally:
        caller.kill()
        caller.wait(10)
    assert _gone(daemon, 5), "p2pd outlived its caller killed with SIGKILL"


def test_a_forked_child_is_refused_by_name():
    """No thread serves a forked child (an averager in a child process needs ``network.dht_process``)."""
    node = SwarmDHT.create("thr")
    try:
        ctx = multiprocessing.get_context("fork")
        answer = ctx.SimpleQueue()

        def call() -> None:
            try:
                node.dht.get("k")
                answer.put("answered")
            except RuntimeError as e:
                answer.put(str(e))

        child = ctx.Process(target=call)
        child.start()
        child.join(30)
        assert "cannot be sent from a process forked from it" in answer.get()
    finally:
        node.shutdown()


def test_only_futures_of_idle_loops_are_unbound():
    idle = MPFuture()  # no loop runs on this thread: its caller will wait with result()
    unbind_idle(idle)
    assert idle._loop is None

    async def made_on_a_running_loop() -> MPFuture:
        return MPFuture()

    loop = asyncio.new_event_loop()
    try:
        future = loop.run_until_complete(made_on_a_running_loop())
        assert future._loop is loop
        loop.call_soon(unbind_idle, future)  # while the loop runs: kept, the loop awaits it
        loop.run_until_complete(asyncio.sleep(0))
        assert future._loop is loop
    finally:
        loop.close()
