"""``RunWatcher``: a peer's or trainer's side of run control and metrics.

Every ``poll`` seconds it reads the bootstrap's ``RunControl`` from the DHT (so a pause or stop
reaches everyone within a few seconds) and publishes this node's ``MetricsReport``. When no control
record can be found (the bootstrap is down and its record expired) the last known state stays: the
swarm keeps training without its bootstrap. Every ``BOOTSTRAP_CHECK`` seconds it also looks for a
live ``{run}_bootstraps`` record (refreshed by every running bootstrap): ``bootstrap_seen`` is when it
last found one, what the node's ``/ready`` calls "bootstrap reachable".
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from dht.schemas import MetricsReport, RunControl, RunState
from dht.control import BOOTSTRAPS_TTL, get_bootstraps, get_control, publish_metrics
from dht.records import SwarmDHT
from core.loop import cancel_and_wait

__all__ = ["RunWatcher", "CONTROL_POLL", "BOOTSTRAP_CHECK"]

logger = logging.getLogger(__name__)

CONTROL_POLL = 2.0
BOOTSTRAP_CHECK = 10.0

OnChange = Callable[[RunState], Awaitable[None] | None]


class RunWatcher:
    """Keeps ``state`` current and publishes ``report()`` every round; ``on_change`` hears changes."""

    def __init__(
        self,
        dht: SwarmDHT,
        report: Callable[[], MetricsReport | None],
        *,
        on_change: OnChange | None = None,
        on_control: Callable[[RunControl], None] | None = None,
        poll: float = CONTROL_POLL,
    ):
        self.dht = dht
        self.report = report
        self.on_change = on_change
        self.on_control = on_control
        self.poll = poll
        self.state = RunState.RUNNING
        self.bootstrap_seen: float | None = None  # time.monotonic() when a live bootstrap record was last read
        self._bootstrap_checked = -float("inf")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="run-watcher")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def poll_once(self) -> RunState:
        control = await get_control(self.dht)
        if control is not None and self.on_control is not None:
            self.on_control(control)
        if control is not None and control.state != self.state:
            logger.warning("the run owner set the run to %s%s", control.state.value,
                           f": {control.reason}" if control.reason else "")
            self.state = control.state
            if self.on_change is not None:
                result = self.on_change(control.state)
                if asyncio.iscoroutine(result):
                    await result
        report = self.report()
        if report is not None:
            await publish_metrics(self.dht, report)
        if time.monotonic() - self._bootstrap_checked >= BOOTSTRAP_CHECK:
            self._bootstrap_checked = time.monotonic()
            if await get_bootstraps(self.dht):
                self.bootstrap_seen = time.monotonic()
        return self.state

    def bootstrap_reachable(self) -> bool:
        """A bootstrap of the run announced itself within a record's lifetime."""
        return self.bootstrap_seen is not None and time.monotonic() - self.bootstrap_seen < BOOTSTRAPS_TTL + BOOTSTRAP_CHECK

    async def _loop(self) -> None:
        failures = 0
        while True:
            try:
                await self.poll_once()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a DHT hiccup: keep the last known state, try again next round
                failures += 1
                log = logger.warning if failures in (1, 10) else logger.debug
                log("reading the run state failed (attempt %d): %s", failures, e)
            await asyncio.sleep(self.poll)
