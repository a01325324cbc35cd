"""Run control and metrics records: how the bootstrap tells the swarm to pause, and how trainers and
peers tell the bootstrap what they did.

Three keys, all small, signed and schema-checked like the others:

- ``{run}_control``: one ``RunControl`` (running / paused / stopped) per bootstrap, under the
  bootstrap's signed subkey. Readers trust only entries signed by the key that signed the manifest,
  so a peer cannot pause the run by publishing a control record of its own.
- ``{run}_bootstraps``: one ``BootstrapRecord`` per live bootstrap (a primary and its mirrors),
  signed by the authority like the control record, TTL 60 s: where a joining node asks for a token.
- ``{run}_metrics``: one ``MetricsReport`` per trainer or peer (its own signed subkey, TTL 60 s):
  step, loss, tokens/s and the running total of samples it processed.
"""

from __future__ import annotations

import logging
import re

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from pydantic import ValidationError

from dht.records import SwarmDHT
from dht.schemas import (
    BootstrapRecord,
    MetricsReport,
    RunControl,
    bootstraps_key,
    control_key,
    manifest_key,
    metrics_key,
)

__all__ = [
    "CONTROL_TTL",
    "CONTROL_REFRESH",
    "METRICS_TTL",
    "publish_control",
    "get_control",
    "find_bootstraps",
    "BOOTSTRAPS_TTL",
    "publish_bootstrap",
    "get_bootstraps",
    "publish_metrics",
    "get_metrics",
]

logger = logging.getLogger(__name__)

CONTROL_TTL = 7 * 24 * 3600.0  # as the manifest's: a keyed run stays keyed while no bootstrap is up
CONTROL_REFRESH = 150.0
METRICS_TTL = 60.0
BOOTSTRAPS_TTL = 60.0
_OWNER_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)


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
    revoked: set[str] = set()
    for subkey, entry in _live_items(found):
        if not trusted.intersection(_OWNER_RE.findall(subkey)):
            logger.debug("ignoring a run control record not signed by a bootstrap")
            continue
        try:
            control = RunControl.model_validate(entry.value)
        except ValidationError:
            continue
        revoked.update(control.revoked)
        if newest is None or control.changed_at > newest.changed_at:
            newest = control
    if newest is None or revoked == set(newest.revoked):
        return newest
    # several bootstraps (a primary and mirrors) that have not synced yet: a revocation published by
    # any of them holds (revocation is monotonic), the run state is the newest one's
    return newest.model_copy(update={"revoked": sorted(revoked)[:512]})


async def publish_bootstrap(dht: SwarmDHT, record: BootstrapRecord, ttl: float = BOOTSTRAPS_TTL) -> bool:
    return await dht.dht.store(
        bootstraps_key(dht.run_id), record.model_dump(mode="json"), expiration_time=get_dht_time() + ttl,
        subkey=dht._subkey(), return_future=True,
    )


async def get_bootstraps(dht: SwarmDHT, *, withdrawn: bool = False) -> list[tuple[BootstrapRecord, bytes]]:
    """Live bootstrap records signed by a manifest publisher (the run's authority), with their
    signer, most recently refreshed first; those withdrawn at shutdown only if ``withdrawn``. A
    record whose subkey names another peer is ignored."""
    manifests = await dht.dht.get(manifest_key(dht.run_id), latest=True, return_future=True)
    trusted = {owner for subkey in _subkeys(manifests) for owner in _OWNER_RE.findall(subkey)}
    found = await dht.dht.get(bootstraps_key(dht.run_id), latest=True, return_future=True)
    records = []
    for subkey, entry in _live_items(found):
        owners = _OWNER_RE.findall(subkey)
        if len(owners) != 1 or owners[0] not in trusted:
            continue
        try:
            record = BootstrapRecord.model_validate(entry.value)
        except ValidationError:
            continue
        if (record.serving or withdrawn) and subkey.startswith(record.peer_id.encode() + b"[owner:"):
            records.append((record, owners[0]))
    return sorted(records, key=lambda item: -item[0].updated)


async def find_bootstraps(dht: SwarmDHT) -> list[tuple[str, bytes]]:
    """``(peer id, record public key)`` of every bootstrap (primary or mirror) of the run: those in
    ``{run}_bootstraps`` first (newest first), then any other manifest publisher (a bootstrap of an
    older swarm publishes only the manifest)."""
    records = await get_bootstraps(dht, withdrawn=True)
    found = [(record.peer_id, owner) for record, owner in records if record.serving]
    known = {record.peer_id for record, _ in records}  # a bootstrap that withdrew is not asked
    manifests = await dht.dht.get(manifest_key(dht.run_id), latest=True, return_future=True)
    for subkey in _subkeys(manifests):
        owners = _OWNER_RE.findall(subkey)
        if len(owners) == 1:
            peer = subkey[: subkey.index(b"[owner:")].decode(errors="replace")
            if peer not in known:
                known.add(peer)
                found.append((peer, owners[0]))
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
