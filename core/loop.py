"""A private event loop in a background thread, for synchronous code (torch autograd) that needs
to await network calls."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import traceback
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

import uvloop

__all__ = ["LoopThread", "cancel_and_wait", "bounded", "off_loop", "stacks_if_slow", "Lifecycle", "TaskSet",
           "start_unless_stopped"]

T = TypeVar("T")

logger = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel a background task (None: nothing to do) and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def bounded(step: Awaitable[Any], seconds: float, what: str) -> None:
    """One step of a shutdown: waited for at most ``seconds``; a step that hangs or fails is logged
    (naming ``what``) and left behind, so that ``stop()`` always returns and the steps after it run."""
    try:
        await asyncio.wait_for(step, seconds)
    except asyncio.TimeoutError:
        logger.warning("stopping: %s did not finish within %.0f s; going on without it", what, seconds)
    except Exception as e:  # a daemon already gone, a closed pipe: nothing left to undo
        logger.debug("stopping: %s: %s: %s", what, type(e).__name__, e)


def off_loop(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> asyncio.Future[T]:
    """``fn(*args, **kwargs)`` on a daemon thread of its own, as a future of the running loop. Unlike
    ``asyncio.to_thread`` (the loop's default executor), a call that never returns holds up neither
    ``bounded`` nor the process's exit: ``asyncio.run`` joins the default executor's threads at its
    end, unbounded, and the interpreter joins non-daemon threads."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def call() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # handed to the awaiting task
            outcome = (False, e)
        else:
            outcome = (True, result)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=call, name=f"off-loop-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return future


@contextlib.contextmanager
def stacks_if_slow(seconds: float, what: str):
    """Within the block, log every thread's stack (a warning) if the block has not ended after
    ``seconds``: a stop that hangs says where, in the field and in a test's log alike."""
    done = threading.Event()

    def watch() -> None:
        if not done.wait(seconds):
            frames = sys._current_frames()
            text = "\n".join(f"--- thread {t.name} ---\n" + "".join(traceback.format_stack(frames[t.ident]))
                              for t in threading.enumerate() if t.ident in frames)
            logger.warning("%s has taken over %.0f s; the threads are at:\n%s", what, seconds, text)

    threading.Thread(target=watch, name="slow-watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()


class TaskSet:
    """The background tasks of one owner: ``spawn`` starts one, ``close`` cancels those still running
    and waits until they have ended, so none outlives its owner. A task that ends leaves the set; one
    that failed is logged (its loop was meant to catch and log its own errors)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task:
        if self._closed:
            coro.close()
            raise RuntimeError(f"cannot start {name}: its owner is stopping")
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    async def close(self) -> None:
        """Cancel every task and wait for them; no task can be added afterwards. Idempotent."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _ended(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s failed", task.get_name(), exc_info=task.exception())


class Lifecycle:
    """``start`` once (a failed start stops what it started), ``wait_closed``, ``async with``. A
    subclass writes ``_start`` and a ``stop`` that is idempotent and calls ``_mark_closed`` last."""

    _started = False
    _closed_event: asyncio.Event | None = None

    async def _start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        async with contextlib.AsyncExitStack() as undo:  # a start that fails or is cancelled is stopped
            undo.push_async_callback(self.stop)
            await self._start()
            undo.pop_all()

    @property
    def _closed(self) -> asyncio.Event:
        if self._closed_event is None:
            self._closed_event = asyncio.Event()
        return self._closed_event

    def _mark_closed(self) -> None:
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


async def start_unless_stopped(service: Lifecycle, stop: asyncio.Event) -> bool:
    """Start ``service``; if ``stop`` is set first (Ctrl+C while joining), cancel the start, stop
    the service and return False. A start that fails raises its error."""
    start = asyncio.create_task(service.start())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    await cancel_and_wait(stopped)
    if not start.done():
        await cancel_and_wait(start)
        await service.stop()
        return False
    start.result()
    return True


class LoopThread:
    """Runs coroutines on a uvloop event loop owned by a daemon thread. ``stop()`` is idempotent."""

    def __init__(self, name: str = "swarm-loop"):
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if not self._thread.is_alive():
            coro.close()
            raise RuntimeError("the swarm event loop has been stopped")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:  # Ctrl+C or a timeout in the caller: the coroutine must not run on
            future.cancel()
            raise

    def stop(self) -> None:
        """Cancel whatever still runs on the loop, then stop it and join the thread."""
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_cancel_others(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


async def _cancel_others() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
