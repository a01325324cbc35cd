"""A stage's compute thread with a bounded queue.

Every stage computes on one long-lived thread (no per-request thread or process): torch keeps an
OpenMP team per calling thread, and the module and optimizer then need no locks. The event loop only
parses and validates; pipelined trainers keep several microbatches queued here, so the thread has its
next one ready when it finishes one. The queue is bounded: past ``queue_size`` waiting forwards and
backwards, new ones are refused with ``CapacityExceeded`` rather than piling up memory (each holds its
activations) and latency.

The event loop hands work over with ``run`` (``on_thread``): a job on a ``queue.SimpleQueue``,
answered straight into an asyncio future with ``loop.call_soon_threadsafe``. ``run_in_executor``
goes through a ``concurrent.futures.Future`` chained to an asyncio one, a lock and callbacks on
both sides; for a 1-token step, whose whole hop should cost under a millisecond, that chain was a
measurable share (``benchmarks/hop_latency.py``). ``submit`` (an ``Executor``'s) stays for code that
wants a ``concurrent.futures.Future``; both feed the same queue, so jobs run in the order given.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Callable

from core.errors import CapacityExceeded

__all__ = ["ComputeWorker", "DEFAULT_QUEUE_SIZE", "on_thread"]

DEFAULT_QUEUE_SIZE = 64


@dataclass
class _Job:
    """One call for the thread and where its outcome goes: a ``concurrent.futures.Future``
    (``submit``) or an asyncio future of ``loop`` (``run``)."""

    fn: Callable
    args: tuple
    kwargs: dict
    future: Future | None = None
    loop: asyncio.AbstractEventLoop | None = None
    waiter: asyncio.Future | None = None

    def wanted(self) -> bool:
        """False when nobody waits for it any more (cancelled before it started): then it is skipped,
        as ``run_in_executor`` skips a cancelled job."""
        if self.future is not None:
            return self.future.set_running_or_notify_cancel()
        return not self.waiter.cancelled()  # a read of its state: safe from this thread under the GIL

    def settle(self, result: Any, error: BaseException | None) -> None:
        if self.future is not None:
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is left to tell
            self.loop.call_soon_threadsafe(_answer, self.waiter, result, error)

    def cancel(self) -> None:
        if self.future is not None:
            self.future.cancel()
            return
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.waiter.cancel)


def _answer(waiter: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if waiter.done():  # cancelled while it ran
        return
    if error is None:
        waiter.set_result(result)
    else:
        waiter.set_exception(error)


class ComputeWorker(Executor):
    """One compute thread; ``pending`` counts the jobs given and not finished (running included)."""

    def __init__(self, name: str, *, queue_size: int = DEFAULT_QUEUE_SIZE):
        self.queue_size = queue_size
        self._pending = 0
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        # a daemon: a peer that dies without stop() must still exit; stop() joins it (``shutdown``)
        self._thread = threading.Thread(target=self._serve, name=f"{name}_0", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    def admit(self, what: str) -> None:
        """Refuse new data-plane work when the queue is full (control calls such as a step bypass this:
        refusing them would leave replicas out of a step)."""
        if self._pending >= self.queue_size:
            raise CapacityExceeded(f"{what}: {self._pending} requests are queued on this stage (at most "
                                   f"{self.queue_size}); try another replica or later")

    async def run(self, fn: Callable, /, *args: Any) -> Any:
        """``fn(*args)`` on the thread, awaited; its exception is raised here. Cancelling the caller
        before the job starts skips it; once it runs, it runs to its end (as ``run_in_executor``)."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._put(_Job(fn, args, {}, loop=loop, waiter=waiter))
        return await waiter

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        self._put(_Job(fn, args, kwargs, future=future))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new jobs; with ``cancel_futures`` the queued ones are cancelled (their callers see
        ``CancelledError``), else they run first. ``wait``: until the thread has ended."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if cancel_futures:
                    self._drop_queued()
                self._jobs.put(None)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _put(self, job: _Job) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._pending += 1
            self._jobs.put(job)

    def _drop_queued(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._pending -= 1
                job.cancel()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            outcome = self._call(job) if job.wanted() else None
            with self._lock:  # counted off before the caller hears: a caller that has its answer sees it gone
                self._pending -= 1
            if outcome is not None:
                job.settle(*outcome)
            del job, outcome  # its tensors are not held while the thread waits for the next one

    @staticmethod
    def _call(job: _Job) -> tuple[Any, BaseException | None]:
        try:
            return job.fn(*job.args, **job.kwargs), None
        except BaseException as error:  # the caller's to handle, as a thread pool hands it over
            return None, error


async def on_thread(worker: Executor, fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` on ``worker``'s thread: the direct hand-over of a ``ComputeWorker``, any other
    executor through ``run_in_executor``."""
    if isinstance(worker, ComputeWorker):
        return await worker.run(fn, *args)
    return await asyncio.get_running_loop().run_in_executor(worker, fn, *args)
