"""Who may send how much to this node, decided before a request's body is read.

Every stream a ``P2PTransport`` serves opens with the caller's libp2p identity (authenticated by the
secure channel), so the decision needs no byte of the request:

1. **Streams per caller.** A caller may hold at most ``CallerLimits.max_streams`` streams open on this
   node at once; the next one is answered ``CapacityExceeded`` and closed unread.
2. **The gate.** On a keyed run every method but the few public ones (presenting a token, asking a
   bootstrap for one) answers ``AuthRejected`` to a caller that has not presented a valid token,
   before anything beyond the stream's opening is read (at most ``REFUSED_DISCARD_BYTES`` of what it
   already sent is read and dropped, so that the refusal reaches it instead of a reset stream).
3. **Bytes per caller.** What a caller's requests on this node announce in their frame headers is
   reserved as each header arrives, before its body is read, and released when the request has been
   answered: at most ``CallerLimits.max_bytes`` at once (one request alone may reserve up to its own
   method's limit, e.g. a checkpoint upload). Over the limit the request is ``CapacityExceeded``.
4. **Refused again and again.** A caller the gate has refused more than ``FREE_REFUSALS`` times in the
   last ``REFUSAL_WINDOW`` seconds has each further refusal held for ``REFUSAL_HOLD`` seconds, its
   stream open and unread, before the answer (``refusal_hold``). A caller whose token lapsed is told at
   once; a flood is slowed to what its open streams allow (``max_streams`` a ``REFUSAL_HOLD``), and
   what it sends meanwhile waits in flow control instead of costing this node reading and decrypting.

Public methods take at most ``PUBLIC_REQUEST_BYTES``: a token or a key, never tensors.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Protocol

from core.errors import CapacityExceeded
from core.types import PeerId

__all__ = [
    "Gate",
    "CallerLimits",
    "Ticket",
    "PUBLIC_REQUEST_BYTES",
    "REFUSED_DISCARD_BYTES",
    "MAX_STREAMS_PER_CALLER",
    "MAX_BYTES_PER_CALLER",
    "stream_refusal",
    "bytes_refusal",
    "refusal_hold",
    "Refusals",
    "FREE_REFUSALS",
    "REFUSAL_WINDOW",
    "REFUSAL_HOLD",
]

PUBLIC_REQUEST_BYTES = 64 << 10
REFUSED_DISCARD_BYTES = 64 << 10  # enough for a small refused call to get its AuthRejected; a flood is reset
MAX_STREAMS_PER_CALLER = 64
MAX_BYTES_PER_CALLER = 1 << 30
FREE_REFUSALS = 3  # answered at once: a lapsed token, a race with its presentation
REFUSAL_WINDOW = 10.0
REFUSAL_HOLD = 2.0


class Gate(Protocol):
    """Raises ``AuthRejected`` for a caller that may not use this node's gated methods
    (``net.auth.AuthGate``)."""

    def check(self, caller: PeerId | None) -> None: ...


def stream_refusal(open_streams: int, max_streams: int) -> str | None:
    """Why a caller with ``open_streams`` streams open may not open another (None: it may)."""
    if open_streams >= max_streams:
        return f"this caller already has {open_streams} streams open here (at most {max_streams})"
    return None


def bytes_refusal(in_flight: int, more: int, method_limit: int | None, max_bytes: int) -> str | None:
    """Why a caller with ``in_flight`` bytes reserved may not reserve ``more`` (None: it may). A
    request alone may take its method's own limit (``method_limit``, None = unbounded) when that is
    larger than ``max_bytes``: a checkpoint upload is one request, not a flood."""
    wanted = in_flight + more
    if wanted <= max_bytes:
        return None
    if in_flight == 0 and (method_limit is None or more <= method_limit):
        return None
    return f"this caller's requests in flight here would reach {wanted >> 20} MiB (at most {max_bytes >> 20} MiB)"


def refusal_hold(recent: int, free: int = FREE_REFUSALS, hold: float = REFUSAL_HOLD) -> float:
    """How long to hold a gate refusal, unread, before answering it, for a caller already refused
    ``recent`` times in the window: not at all for the first ``free``, ``hold`` seconds after."""
    return 0.0 if recent < free else hold


@dataclass
class Refusals:
    """The gate's recent refusals per caller (one event loop: no locks needed); ``hold(caller, now)``
    counts one more and says how long to hold it (``refusal_hold``)."""

    window: float = REFUSAL_WINDOW
    free: int = FREE_REFUSALS
    seconds: float = REFUSAL_HOLD
    recent: dict[str, deque] = field(default_factory=dict)

    def hold(self, caller: PeerId, now: float) -> float:
        times = self.recent.setdefault(caller, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        delay = refusal_hold(len(times), self.free, self.seconds)
        times.append(now)
        self._forget(now)
        return delay

    def _forget(self, now: float) -> None:
        """Drop callers with no refusal in the window, so that many one-off strangers cost nothing."""
        if len(self.recent) > 1024:
            for caller in [c for c, times in self.recent.items() if not times or times[-1] <= now - self.window]:
                del self.recent[caller]


@dataclass
class CallerLimits:
    """Open streams and reserved bytes per caller on one node (one event loop: no locks needed)."""

    max_streams: int = MAX_STREAMS_PER_CALLER
    max_bytes: int = MAX_BYTES_PER_CALLER
    streams: Counter = field(default_factory=Counter)
    in_flight: Counter = field(default_factory=Counter)

    def open(self, caller: PeerId, method_limit: int | None) -> "Ticket":
        """A ticket for one stream of ``caller`` (``CapacityExceeded`` if it has too many open)."""
        why = stream_refusal(self.streams[caller], self.max_streams)
        if why is not None:
            raise CapacityExceeded(why)
        self.streams[caller] += 1
        return Ticket(self, caller, method_limit)


class Ticket:
    """One open stream's share of its caller's limits; ``close()`` (or leaving ``with``) gives it back."""

    def __init__(self, limits: CallerLimits, caller: PeerId, method_limit: int | None):
        self.limits, self.caller, self.method_limit = limits, caller, method_limit
        self.reserved = 0
        self._closed = False

    def reserve(self, more: int) -> None:
        """Reserve ``more`` bytes of a frame announced by its header (``CapacityExceeded`` if over)."""
        limits = self.limits
        in_flight = limits.in_flight[self.caller]
        alone = in_flight == self.reserved  # only this stream of the caller holds bytes
        why = bytes_refusal(0 if alone else in_flight, (self.reserved if alone else 0) + more, self.method_limit,
                            limits.max_bytes)
        if why is not None:
            raise CapacityExceeded(why)
        limits.in_flight[self.caller] += more
        self.reserved += more

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        limits, caller = self.limits, self.caller
        limits.in_flight[caller] -= self.reserved
        limits.streams[caller] -= 1
        if limits.in_flight[caller] <= 0:
            del limits.in_flight[caller]
        if limits.streams[caller] <= 0:
            del limits.streams[caller]

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
