"""The owner's alerts: what is wrong with the run now (a pure function), and a webhook that hears
each problem once, when it starts.

``alerts_of`` reads one ``swarm status`` and the run's progress and names every problem as an
``Alert`` with a stable ``key``: a stage down to one replica (``stage.one``) or none
(``stage.none``), a peer whose record went stale (``peer.stale``), a NaN loss (``loss.nan``), a step
that has not moved for ``stall_after`` seconds while the run runs and trainers report
(``step.stalled``). ``AlertBook`` keeps the alerts active now and says which are new: a problem is
posted (and audited) once when it starts, and again only after it has cleared. The webhook gets
``{"text": ..., "run_id", "kind", "key", "at"}`` (``text`` is what Slack and most chat hooks show);
posting is bounded (3 tries, backing off) and a failure is logged, never raised: alerts must not
stop the bootstrap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import urllib.error
import urllib.request
from dataclasses import dataclass

from peers.telemetry.status import Status

__all__ = ["Alert", "AlertBook", "alerts_of", "post_alert", "Progress"]

logger = logging.getLogger(__name__)

_TRIES = 3


@dataclass(frozen=True)
class Alert:
    kind: str
    key: str
    text: str


@dataclass(frozen=True)
class Progress:
    """The run's progress as the bootstrap saw it: the step, since when it has not moved, the last
    loss, the run state (``running``, ``paused``, ``stopped``) and whether trainers report."""

    step: int
    step_since: float
    loss: float | None
    run_state: str
    trainers: int


def alerts_of(status: Status | None, progress: Progress, *, now: float, stall_after: float) -> list[Alert]:
    """Every problem of the run now (see the module docstring); pure. A run its owner stopped has
    none: its peers leave on purpose."""
    found: list[Alert] = []
    if progress.run_state == "stopped":
        return found
    for stage in status.stages if status is not None else ():
        if stage.online == 0:
            found.append(Alert("stage.none", f"stage.none:{stage.index}",
                               f"stage {stage.index} has no online peer: training is blocked"))
        elif stage.online == 1:
            found.append(Alert("stage.one", f"stage.one:{stage.index}",
                               f"stage {stage.index} is down to one replica ({stage.online_peers[0][-8:]})"))
    for peer in status.peers if status is not None else ():
        if peer.stale:
            found.append(Alert("peer.stale", f"peer.stale:{peer.peer_id}",
                               f"peer {peer.peer_id[-8:]} is stale: no record refresh for {peer.age:.0f} s"))
    if progress.loss is not None and math.isnan(progress.loss):
        found.append(Alert("loss.nan", "loss.nan", f"the loss is NaN at step {progress.step}"))
    stalled = now - progress.step_since
    if progress.run_state == "running" and progress.trainers and stalled >= stall_after:
        found.append(Alert("step.stalled", "step.stalled",
                           f"the training step has stayed at {progress.step} for {stalled:.0f} s"))
    return found


class AlertBook:
    """The alerts active now; ``update`` returns the ones that just started."""

    def __init__(self) -> None:
        self.active: dict[str, Alert] = {}

    def update(self, alerts: list[Alert]) -> list[Alert]:
        fresh = [a for a in alerts if a.key not in self.active]
        self.active = {a.key: a for a in alerts}
        return fresh


async def post_alert(url: str, run_id: str, alert: Alert, at: float, *, timeout: float = 5.0) -> bool:
    """POST ``alert`` to the webhook; True once it answered 2xx (3 tries, 1 then 2 s apart)."""
    body = json.dumps({"text": f"[swarm run {run_id}] {alert.text}", "run_id": run_id, "kind": alert.kind,
                       "key": alert.key, "at": at}).encode()
    for attempt in range(1, _TRIES + 1):
        try:
            await asyncio.to_thread(_post, url, body, timeout)
            return True
        except (OSError, urllib.error.URLError) as e:  # the hook is down or slow: retry, then give up
            logger.warning("alert webhook %s failed (attempt %d of %d): %s", url, attempt, _TRIES, e)
            if attempt < _TRIES:
                await asyncio.sleep(attempt)
    return False


def _post(url: str, body: bytes, timeout: float) -> None:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        reply.read()
