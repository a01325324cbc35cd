"""hivemind's control pipe, for a hivemind process class (the DHT, an averager) served on a thread of the
caller's process instead of in a child process (issue 27, point 6).

hivemind's ``DHT`` and ``DecentralizedAverager`` are ``mp.Process`` subclasses: their public methods send
``(method, args, kwargs)`` down a pipe, and the child runs ``method`` as a task on its event loop. On a
thread, ``Calls`` takes the pipe's place and hands each call to the thread's loop *by reference*: a pipe
pickles the arguments, and an ``MPFuture`` unpickled in its own origin process is a copy whose result
never reaches the caller's future. ``serve_on_thread`` is the body of such a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from typing import Any, Awaitable, Callable

import uvloop
from hivemind.utils import MPFuture

__all__ = ["Calls", "CLOSE_WAIT", "unbind_idle"]

logger = logging.getLogger(__name__)

Call = tuple[str, list[Any], dict[str, Any]]
CLOSE_WAIT = 5.0  # s beyond the target's shutdown timeout for its thread to close its tasks and clients


class Calls:
    """Stands in for hivemind's control pipe (``_inner_pipe`` and ``_outer_pipe`` both): each call
    ``(method, args, kwargs)`` becomes a task running ``getattr(target, method)(*args, **kwargs)`` on the
    serving thread's loop. Calls sent before the loop serves wait for it; one sent after it stopped is
    refused with a ``RuntimeError`` naming ``what`` is shut down, and so is one from a forked child (no
    thread serves there: hivemind's pipe reached a child process from another, this does not)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._target: Any = None
        self._early: list[Call] = []
        self._closed = False
        self._tasks: set[asyncio.Task] = set()

    def open(self, loop: asyncio.AbstractEventLoop, target: Any) -> None:
        """Serve calls on ``loop`` (the calling thread's, running), the ones sent so far first."""
        with self._lock:
            self._loop, self._target = loop, target
            early, self._early = self._early, []
        for call in early:
            self._dispatch(call)

    def send(self, call: Call) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError(f"{self.what} is served on a thread of process {self._pid}: {call[0]} cannot be "
                               "sent from a process forked from it")
        for arg in [*call[1], *call[2].values()]:
            if isinstance(arg, MPFuture):
                unbind_idle(arg)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.what} is shut down: {call[0]} not sent")
            if self._loop is None:
                self._early.append(call)
                return
            self._loop.call_soon_threadsafe(self._dispatch, call)

    def _dispatch(self, call: Call) -> None:
        method, args, kwargs = call
        self.keep(asyncio.create_task(getattr(self._target, method)(*args, **kwargs)))

    @property
    def closed(self) -> bool:
        return self._closed

    def keep(self, task: asyncio.Task) -> None:
        """Hold a task the loop runs (asyncio keeps only a weak reference) until it ends."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        with self._lock:
            self._closed = True

    async def serve(self, start: Callable[[], Awaitable[None]], target: Any, ready: MPFuture,
                    stopped: asyncio.Event) -> None:
        """``await start()`` (an error goes to ``ready``, which the caller's ``wait_until_ready`` raises),
        then serve calls to ``target`` on the running loop until ``stopped`` is set."""
        try:
            await start()
        except Exception as e:
            ready.set_exception(e)
            return
        self.open(asyncio.get_running_loop(), target)
        ready.set_result(None)
        await stopped.wait()

    def stop(self, thread: threading.Thread, timeout: float) -> bool:
        """Send ``_shutdown(timeout)`` to the target and wait for ``thread`` (the serving thread) to end,
        at most ``timeout`` + ``CLOSE_WAIT`` s; whether it has. A thread that did not is named in a
        warning and left behind. Called on the serving thread itself (hivemind's ``__del__`` there), it
        only asks."""
        with contextlib.suppress(RuntimeError):  # stopping already: the join below waits for it
            self.send(("_shutdown", [timeout], {}))
        if thread is threading.current_thread():
            return False
        thread.join(timeout + CLOSE_WAIT)
        if thread.is_alive():
            logger.warning("%s did not stop within %.0f s; its thread is left behind", self.what, timeout + CLOSE_WAIT)
        return not thread.is_alive()

    def close_pipe(self) -> None:
        """hivemind's ``shutdown`` closes its end of the pipe; nothing to close here."""

    def serve_on_thread(self, serve: Callable[[], Awaitable[None]], close: Callable[[], Awaitable[None]]) -> None:
        """The serving thread's body: a uvloop of its own (hivemind runs its processes on uvloop; the
        process's policy is left alone) runs ``serve()`` until it returns, then calls are refused, every
        task left on it is cancelled and awaited, its default executor shut down and ``close()`` run."""
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(serve())
        finally:
            try:
                loop.run_until_complete(self._wind_down(close))
            finally:
                self.close()
                loop.close()

    async def _wind_down(self, close: Callable[[], Awaitable[None]]) -> None:
        """Refuse new calls first; then cancel every task, again until none is left (a call handed over
        just before the refusal starts its task while the first ones end); then ``close()``."""
        self.close()
        await asyncio.sleep(0)
        while tasks := [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.get_running_loop().shutdown_default_executor()  # hivemind's load balancing runs there
        await close()


def unbind_idle(future: MPFuture) -> None:
    """Detach ``future`` from the event loop of the thread that made it when that loop is not running
    (the caller waits with ``result()``): the serving thread sets it, and hivemind would then run that
    idle loop there to wake its awaiters, which fails on a thread whose own loop is running. A future
    made on a running loop (a coroutine that awaits it: the peer's loop awaits DHT futures) stays bound,
    and hivemind wakes it with ``run_coroutine_threadsafe``."""
    loop = future._loop
    if loop is not None and not loop.is_running():
        future._loop = future._aio_event = None
