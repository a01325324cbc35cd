"""Liveness and readiness, as every swarm HTTP server answers them (``/health``, ``/ready``).

``/health`` says the process serves HTTP at all (a supervisor restarts it when this fails);
``/ready`` says whether it can do its job now, check by check, so a load balancer or ``docker
compose`` waits for it and the owner sees *which* part is missing. Each server passes its own
``Checks``: a peer (DHT connected, stage loaded, bootstrap reachable), the bootstrap (DHT, manifest
published, state database), serve-api (DHT, every stage served, bootstrap reachable).
"""

from __future__ import annotations

import json
import logging
from typing import Callable

__all__ = ["Checks", "readiness", "health_body", "wsgi_health"]

logger = logging.getLogger(__name__)

Checks = Callable[[], dict[str, bool]]
"""Named yes/no checks; the server is ready when every one is yes."""


def readiness(checks: Checks | None) -> tuple[int, dict]:
    """HTTP status and body of ``/ready``: 200 when every check passes, else 503 naming the failing
    ones. A check that raises counts as failed (it is logged): readiness must never 500."""
    try:
        results = dict(checks()) if checks is not None else {}
    except Exception as e:  # a check reading a half-stopped part: not ready, and say why in the log
        logger.info("a readiness check failed: %s", e)
        results = {"checks": False}
    ready = all(results.values())
    body = {"ready": ready, "checks": results, "failing": sorted(k for k, ok in results.items() if not ok)}
    return (200 if ready else 503), body


def health_body() -> dict:
    return {"status": "ok"}


def wsgi_health(path: str, checks: Checks | None) -> tuple[str, bytes] | None:
    """The WSGI status line and JSON body for ``/health`` or ``/ready``; None for any other path."""
    if path == "/health":
        return "200 OK", json.dumps(health_body()).encode()
    if path == "/ready":
        code, body = readiness(checks)
        return ("200 OK" if code == 200 else "503 Service Unavailable"), json.dumps(body).encode()
    return None
