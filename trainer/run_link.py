"""``RunLink``: a trainer's link to the run's control plane, apart from its data plane.

It follows the run owner's pause and stop (``peers.telemetry.runcontrol.RunWatcher``), keeps this
trainer's membership of a keyed run current (``net.auth.RunAuth``: its token, renewed, and the run's
revocations), and publishes how far this trainer is (``MetricsReport``: step, loss, tokens/s and the
rows it trained) for `swarm status`. ``SwarmModelForCausalLM`` owns one and stops it first in
``close()``.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from dht.records import SwarmDHT
from dht.schemas import MetricsReport, RunState
from net.auth import RunAuth
from peers.telemetry.runcontrol import RunWatcher
from core.errors import RunStopped
from core.loop import LoopThread

__all__ = ["RunLink"]

logger = logging.getLogger(__name__)


class RunLink:
    """The run state this trainer follows and the progress it reports. Until ``start`` (a model not
    made by ``from_pretrained``) the run counts as running and nothing is published. ``auth`` (None:
    an open run) is owned from construction on: ``stop`` stops it, started or not."""

    def __init__(self, auth: RunAuth | None = None) -> None:
        self.auth = auth
        self.watcher: RunWatcher | None = None
        self.progress: dict = {"step": 0, "loss": None, "tokens_per_second": 0.0}
        self.samples = 0

    async def start(self, dht: SwarmDHT) -> None:
        """Follow the run state (pause/stop) and publish this trainer's progress; the first read is
        done now so that a trainer joining a paused run waits from its first step."""
        self.watcher = RunWatcher(dht, self._metrics_report,
                                  on_control=self.auth.follow if self.auth is not None else None)
        if self.auth is not None:
            self.auth.start()
        try:
            await self.watcher.poll_once()
        except Exception as e:  # no control record reachable yet: the run counts as running
            logger.debug("first run-state read failed: %s", e)
        self.watcher.start()

    def stop(self, runner: LoopThread) -> None:
        """Stop following the run, then the keyed run's membership, on ``runner``. Idempotent; a part
        whose loop is already gone is skipped (there is nothing left to stop)."""
        parts = ((self.watcher, "run watcher stop"), (self.auth, "auth stop"))
        self.watcher, self.auth = None, None
        for part, what in parts:
            if part is not None:
                try:
                    runner.run(part.stop(), timeout=10)
                except Exception as e:  # the loop is already gone
                    logger.debug("%s: %s", what, e)

    @property
    def state(self) -> RunState:
        return self.watcher.state if self.watcher is not None else RunState.RUNNING

    def wait_while_paused(self, on_pause: Callable[[], None] | None = None, poll: float = 0.5) -> None:
        """Block while the run owner has the run paused (say so once); ``RunStopped`` if stopped."""
        said = False
        while self.state == RunState.PAUSED:
            if not said:
                logger.warning("the run is paused by its owner: waiting for `swarm run resume`")
                if on_pause is not None:
                    on_pause()
                said = True
            time.sleep(poll)
        if self.state == RunState.STOPPED:
            raise RunStopped("the run owner stopped the run")
        if said:
            logger.warning("the run was resumed")

    def admit(self, rows: int) -> None:
        """Before a training batch of ``rows`` rows: wait out a pause (``RunStopped`` if the run was
        stopped), then count the rows in the samples this trainer reports."""
        self.wait_while_paused()
        self.samples += rows

    def report_progress(self, step: int, loss: float | None = None, tokens_per_second: float = 0.0) -> None:
        """Tell the bootstrap (through the DHT, within a few seconds) how far this trainer is."""
        self.progress = {"step": step, "loss": loss, "tokens_per_second": tokens_per_second}

    def _metrics_report(self) -> MetricsReport | None:
        if self.watcher is None:
            return None
        token = self.auth.token if self.auth is not None else None
        return MetricsReport(peer_id=self.watcher.dht.peer_id, role="trainer", samples=self.samples,
                             access_token=token, **self.progress)
