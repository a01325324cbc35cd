"""Run control and metrics records: how the bootstrap tells the swarm to pause, and how trainers and
peers tell the bootstrap what they did.

Two keys, both small, signed and schema-checked like the others:

- ``{run}_control``: one ``RunControl`` (running / paused / stopped) per bootstrap, under the
  bootstrap's signed subkey. Readers trust only entries signed by the key that signed the manifest,
  so a peer cannot pause the run by publishing a control record of its own.
- ``{run}_metrics``: one ``MetricsReport`` per trainer or peer (its own signed subkey, TTL 60 s):
  step, loss, tokens/s and the running total of samples it processed.
"""

from __future__ import annotations

import logging
import re
from enum import Enum
from typing import Literal

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from pydantic import Field, ValidationError

from dht.records import SwarmDHT
from dht.schemas import PROTOCOL_VERSION, FrozenModel, manifest_key

__all__ = [
    "CONTROL_TTL",
    "METRICS_TTL",
    "RunState",
    "RunControl",
    "MetricsReport",
    "control_key",
    "metrics_key",
    "publish_control",
    "get_control",
    "find_bootstraps",
    "publish_metrics",
    "get_metrics",
]

logger = logging.getLogger(__name__)

CONTROL_TTL = 600.0
METRICS_TTL = 60.0
_OWNER_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)


class RunState(str, Enum):
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class RunControl(FrozenModel):
    """What the run owner wants now. ``changed_at`` (DHT time) orders records of several bootstraps."""

    version: int = PROTOCOL_VERSION
    state: RunState = RunState.RUNNING
    changed_at: float = 0.0
    reason: str = Field("", max_length=200)
    keys_required: bool = False
    revoked: list[str] = Field(default_factory=list, max_length=512)


class MetricsReport(FrozenModel):
    """One trainer's or peer's latest figures. ``samples`` is a running total since it started."""

    version: int = PROTOCOL_VERSION
    peer_id: str = Field(min_length=1, max_length=128)
    role: Literal["trainer", "peer"]
    step: int = Field(0, ge=0)
    loss: float | None = None
    tokens_per_second: float = Field(0.0, ge=0)
    samples: int = Field(0, ge=0)
    stage: int | None = Field(None, ge=0)
    access_token: str | None = Field(None, max_length=4096)


def control_key(run_id: str) -> str:
    return f"{run_id}_control"


def metrics_key(run_id: str) -> str:
    return f"{run_id}_metrics"


async def publish_control(dht: SwarmDHT, control: RunControl, ttl: float = CONTROL_TTL) -> bool:
    return await dht.dht.store(
        control_key(dht.run_id), control.model_dump(mode="json"), expiration_time=get_dht_time() + ttl,
        subkey=dht._subkey(), return_future=True,
    )


async def get_control(dht: SwarmDHT) -> RunControl | None:
    """The newest control record signed by a manifest publisher (a bootstrap), or None."""
    manifests = await dht.dht.get(manifest_key(dht.run_id), latest=True, return_future=True)
    trusted = {owner for subkey in _subkeys(manifests) for owner in _OWNER_RE.findall(subkey)}
    found = await dht.dht.get(control_key(dht.run_id), latest=True, return_future=True)
    newest: RunControl | None = None
    for subkey, entry in _live_items(found):
        if not trusted.intersection(_OWNER_RE.findall(subkey)):
            logger.debug("ignoring a run control record not signed by a bootstrap")
            continue
        try:
            control = RunControl.model_validate(entry.value)
        except ValidationError:
            continue
        if newest is None or control.changed_at > newest.changed_at:
            newest = control
    return newest


async def find_bootstraps(dht: SwarmDHT) -> list[tuple[str, bytes]]:
    """``(peer id, record public key)`` of every bootstrap publishing the run's manifest now."""
    manifests = await dht.dht.get(manifest_key(dht.run_id), latest=True, return_future=True)
    found = []
    for subkey in _subkeys(manifests):
        owners = _OWNER_RE.findall(subkey)
        if len(owners) == 1:
            found.append((subkey[: subkey.index(b"[owner:")].decode(errors="replace"), owners[0]))
    return found


async def publish_metrics(dht: SwarmDHT, report: MetricsReport, ttl: float = METRICS_TTL) -> bool:
    return await dht.dht.store(
        metrics_key(dht.run_id), report.model_dump(mode="json"), expiration_time=get_dht_time() + ttl,
        subkey=dht._subkey(), return_future=True,
    )


async def get_metrics(dht: SwarmDHT) -> list[MetricsReport]:
    """Every live metrics report whose subkey belongs to the peer it names (no one reports for
    another peer: the subkey is signed, and it starts with the signer's peer id)."""
    found = await dht.dht.get(metrics_key(dht.run_id), latest=True, return_future=True)
    reports = []
    for subkey, entry in _live_items(found):
        try:
            report = MetricsReport.model_validate(entry.value)
        except ValidationError:
            continue
        if subkey.startswith(report.peer_id.encode() + b"[owner:"):
            reports.append(report)
    return reports


def _subkeys(found) -> list[bytes]:
    return [subkey for subkey, _ in _live_items(found)]


def _live_items(found) -> list[tuple[bytes, object]]:
    if found is None or not isinstance(found.value, dict):
        return []
    now = get_dht_time()
    return [(subkey if isinstance(subkey, bytes) else str(subkey).encode(), entry)
            for subkey, entry in found.value.items() if entry.expiration_time > now]
