"""What keeps a stop bounded: a call on a daemon thread of its own, a slow stop that says where every
thread is, and hivemind's asynchronous lock entry undone when its waiter was cancelled."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from hivemind.utils.asyncio import _AsyncContextWrapper, enter_asynchronously

from peers.training.averaging import _enter_or_undo
from core.loop import bounded, off_loop, stacks_if_slow


def test_off_loop_returns_the_value_and_raises_the_error():
    async def main():
        assert await off_loop(lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(ZeroDivisionError):
            await off_loop(lambda: 1 / 0)

    asyncio.run(main())


def test_a_call_that_never_returns_holds_up_neither_bounded_nor_the_end_of_asyncio_run():
    never = threading.Event()
    started = time.monotonic()

    async def main():
        await bounded(off_loop(never.wait), 0.2, "a part that hangs")

    asyncio.run(main())  # asyncio.to_thread here would leave asyncio.run joining its thread forever
    assert time.monotonic() - started < 5
    never.set()


def test_a_slow_block_logs_every_threads_stack_and_a_quick_one_nothing(caplog):
    caplog.set_level(logging.WARNING, logger="core.loop")
    with stacks_if_slow(5.0, "a quick stop"):
        pass
    with stacks_if_slow(0.1, "a slow stop"):
        time.sleep(0.5)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "a slow stop has taken over 0 s" in messages[0]
    assert "--- thread MainThread ---" in messages[0] and "time.sleep(0.5)" in messages[0]


def test_a_cancelled_asynchronous_entry_releases_the_lock_it_took_after_all():
    assert _AsyncContextWrapper.__aenter__ is _enter_or_undo  # put in place by importing the averager
    lock = threading.Lock()
    lock.acquire()  # held elsewhere (the compute thread putting gradients in)

    async def main():
        async def enter():
            async with enter_asynchronously(lock):
                pass

        task = asyncio.create_task(enter())
        await asyncio.sleep(0.1)  # waiting for the lock on hivemind's executor thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        lock.release()  # now the executor's thread takes it, for a waiter that is gone
        await asyncio.sleep(0.3)

    asyncio.run(main())
    assert lock.acquire(timeout=2), "the lock taken for a cancelled waiter was never released"
