"""What a peer's RPC handlers do, counted: requests per method and outcome, latency, tokens, queue.

``ObservedTransport`` wraps the transport a service registers on, so every handler is timed and
counted without the service knowing; ``Activity`` keeps the counts, computes recent rates for the
DHT record and the live line, and tells its listeners (Prometheus, the contribution ledger) about
each finished request.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from net.rpc import Outgoing
from net.transport import Handler, Transport
from core.types import PeerId, StageIndex

__all__ = ["RequestDone", "Activity", "ObservedTransport", "work_of"]

RATE_WINDOW = 60.0
"""Seconds over which requests/s and tokens/s are computed."""


@dataclass(frozen=True)
class RequestDone:
    """One finished request: ``method`` is the RPC's last name part (forward, backward, info ...);
    ``stage`` and ``samples``/``tokens`` describe the work it carried (0 for control calls)."""

    method: str
    seconds: float
    ok: bool
    stage: StageIndex | None
    samples: int
    tokens: int


def work_of(method: str, message: Any, tensors: Sequence[torch.Tensor]) -> tuple[int | None, int, int]:
    """(stage, samples, tokens) of a forward/backward request (its decoded message, or the parsed
    request a push hands its own handler): its first tensor is [batch, seq, hidden]."""
    if method not in ("forward", "backward") or not tensors or tensors[0].ndim < 2:
        return None, 0, 0
    stage = message.get("stage") if isinstance(message, dict) else getattr(message, "stage", None)
    batch, seq = tensors[0].shape[0], tensors[0].shape[1]
    return (stage if isinstance(stage, int) else None), int(batch), int(batch * seq)


class Activity:
    """Counters and recent rates of one peer's requests."""

    def __init__(self, *, window: float = RATE_WINDOW, clock: Callable[[], float] = time.monotonic):
        self.window = window
        self.in_flight = 0
        self.requests = 0
        self.errors = 0
        self.tokens = 0
        self.microbatches = 0
        self.listeners: list[Callable[[RequestDone], None]] = []
        self._clock = clock
        self._started = clock()
        self._recent: deque[tuple[float, int]] = deque()

    def started(self) -> None:
        self.in_flight += 1

    def finished(self, done: RequestDone) -> None:
        self.in_flight -= 1
        self.requests += 1
        if not done.ok:
            self.errors += 1
        elif done.tokens:
            self.tokens += done.tokens
            self.microbatches += 1
        now = self._clock()
        self._recent.append((now, done.tokens if done.ok else 0))
        self._forget(now)
        for listener in self.listeners:
            listener(done)

    def rates(self) -> tuple[float, float]:
        """(requests/s, tokens/s) over the last ``window`` seconds (or since start, if shorter)."""
        now = self._clock()
        self._forget(now)
        span = min(self.window, max(now - self._started, 1e-9))
        return len(self._recent) / span, sum(tokens for _, tokens in self._recent) / span

    def _forget(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window:
            self._recent.popleft()


class ObservedTransport:
    """A ``Transport`` whose served handlers report to ``activity``; with ``calls`` (a trainer's
    side), the calls it makes report to that ``Activity`` too (a failed call: ``ok`` False)."""

    def __init__(self, inner: Transport, activity: Activity, *, calls: Activity | None = None):
        self.inner = inner
        self.activity = activity
        self.calls = calls

    async def serve(self, method: str, handler: Handler, **options: Any) -> None:
        await self.inner.serve(method, self.wrap(method, handler), **options)

    def wrap(self, method: str, handler: Handler) -> Handler:
        """``handler`` counted as a request of ``method`` (also when called from within this peer: a
        push computes its hop through its own forward or backward handler)."""
        return self._observed(method.rsplit(".", 1)[-1], handler)

    async def call(self, peer_id: PeerId, method: str, message: Outgoing, tensors: Sequence[torch.Tensor], *,
                   timeout: float) -> tuple[Any, list[torch.Tensor]]:
        if self.calls is None:
            return await self.inner.call(peer_id, method, message, tensors, timeout=timeout)
        name = method.rsplit(".", 1)[-1]
        stage, samples, tokens = work_of(name, message, tensors)
        self.calls.started()
        began, ok = time.perf_counter(), False
        try:
            reply, out = await self.inner.call(peer_id, method, message, tensors, timeout=timeout)
            ok = isinstance(reply, dict) and "ok" in reply
            return reply, out
        finally:
            self.calls.finished(RequestDone(name, time.perf_counter() - began, ok, stage, samples, tokens))

    def _observed(self, name: str, handler: Handler) -> Handler:
        activity = self.activity

        async def observed(message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
            stage, samples, tokens = work_of(name, message, tensors)
            activity.started()
            began, ok = time.perf_counter(), False
            try:
                reply, out = await handler(message, tensors)
                ok = isinstance(reply, dict) and "ok" in reply
                return reply, out
            finally:
                activity.finished(RequestDone(name, time.perf_counter() - began, ok, stage, samples, tokens))

        return observed
