"""A stage's compute thread with a bounded queue.

Every stage computes on one long-lived thread (no per-request thread or process): torch keeps an
OpenMP team per calling thread, and the module and optimizer then need no locks. The event loop only
parses and validates; pipelined trainers keep several microbatches queued here, so the thread has its
next one ready when it finishes one. The queue is bounded: past ``queue_size`` waiting forwards and
backwards, new ones are refused with ``CapacityExceeded`` rather than piling up memory (each holds its
activations) and latency.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from core.errors import CapacityExceeded

__all__ = ["ComputeWorker", "DEFAULT_QUEUE_SIZE"]

DEFAULT_QUEUE_SIZE = 64


class ComputeWorker(ThreadPoolExecutor):
    """One compute thread; ``pending`` counts the jobs submitted and not finished (running included)."""

    def __init__(self, name: str, *, queue_size: int = DEFAULT_QUEUE_SIZE):
        super().__init__(max_workers=1, thread_name_prefix=name)
        self.queue_size = queue_size
        self._pending = 0
        self._count_lock = threading.Lock()

    @property
    def pending(self) -> int:
        return self._pending

    def admit(self, what: str) -> None:
        """Refuse new data-plane work when the queue is full (control calls such as a step bypass this:
        refusing them would leave replicas out of a step)."""
        if self._pending >= self.queue_size:
            raise CapacityExceeded(f"{what}: {self._pending} requests are queued on this stage (at most "
                                   f"{self.queue_size}); try another replica or later")

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        with self._count_lock:
            self._pending += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._finished(None)
            raise
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _future: Future | None) -> None:
        with self._count_lock:
            self._pending -= 1
