"""The stage's compute thread: one thread for every job, and a bounded queue of data-plane work."""

from __future__ import annotations

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
