"""The stage's compute thread: one thread for every job, and a bounded queue of data-plane work."""

from __future__ import annotations

import asyncio
import threading

import pytest

from peers.training.worker import ComputeWorker
from core.errors import CapacityExceeded


def test_a_full_queue_refuses_new_work_with_a_message_and_reopens_when_it_drains():
    worker = ComputeWorker("test", queue_size=2)
    release = threading.Event()
    try:
        futures = [worker.submit(release.wait, 10) for _ in range(2)]
        assert worker.pending == 2
        with pytest.raises(CapacityExceeded, match=r"forward: 2 requests are queued on this stage \(at most 2\)"):
            worker.admit("forward")
        release.set()
        assert [f.result(timeout=10) for f in futures] == [True, True]
        worker.admit("forward")  # drained: admitted again
        assert worker.pending == 0
        names = {worker.submit(lambda: threading.current_thread().name).result(timeout=10) for _ in range(5)}
        assert len(names) == 1 and names.pop().startswith("test")  # one long-lived thread, not one per job
    finally:
        release.set()
        worker.shutdown(wait=True)


def test_run_answers_in_order_on_the_one_thread_and_raises_the_jobs_error():
    async def scenario() -> None:
        worker = ComputeWorker("hop")
        seen: list[int] = []

        def job(index: int) -> tuple[int, str]:
            seen.append(index)
            return index * index, threading.current_thread().name

        try:
            results = await asyncio.gather(*(worker.run(job, i) for i in range(20)))
            assert [square for square, _ in results] == [i * i for i in range(20)]
            assert seen == list(range(20))  # in the order given
            assert {name for _, name in results} == {"hop_0"}
            with pytest.raises(ZeroDivisionError):
                await worker.run(lambda: 1 / 0)
            assert await worker.run(job, 7) == (49, "hop_0")  # an error costs that job only
            assert worker.pending == 0
        finally:
            worker.shutdown(wait=True)

    asyncio.run(scenario())


def test_a_cancelled_caller_skips_its_queued_job_and_stop_cancels_the_queue():
    async def scenario() -> None:
        worker = ComputeWorker("hop", queue_size=8)
        release, ran = threading.Event(), []
        blocker = asyncio.ensure_future(worker.run(release.wait, 10))
        skipped = asyncio.ensure_future(worker.run(ran.append, "skipped"))
        queued = asyncio.ensure_future(worker.run(ran.append, "queued"))
        await asyncio.sleep(0.05)
        skipped.cancel()
        await asyncio.sleep(0.05)
        assert worker.pending == 3
        stopping = asyncio.get_running_loop().run_in_executor(None, lambda: worker.shutdown(cancel_futures=True))
        await asyncio.sleep(0.05)
        release.set()  # the running job ends; the queued ones never start
        await stopping
        assert await blocker is True
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert ran == [] and worker.pending == 0
        assert "hop_0" not in {thread.name for thread in threading.enumerate()}  # joined
        with pytest.raises(RuntimeError, match="after shutdown"):
            await worker.run(ran.append, "late")
        worker.shutdown()  # idempotent

    asyncio.run(scenario())
