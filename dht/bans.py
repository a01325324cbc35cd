"""Signed reports of peers caught returning wrong results, under ``{run}_bans``.

A trainer whose spot check caught a peer (``swarm.spotcheck``) publishes a ``BanReport``: the subkey is
``<banned peer id> + the reporter's owner marker`` (hivemind's ``RSASignatureValidator``), so a report
is signed by its reporter, nobody else can overwrite or withdraw it, and one reporter may ban several
peers. Trainers leave the reported peers out of their routes, peers do not take a stage's state from
them, and the bootstrap revokes the API key a reported peer joined with (keyed runs) and credits it
nothing more. On keyed runs the key is token-gated like the stage records (``dht.auth``), so only a
holder of a run key can report. Reports live ``BAN_TTL`` (a day): a banned machine may rejoin with a
new key after that, and the run owner can lift nothing earlier than by restarting with a new run id.
"""

from __future__ import annotations

import logging

from hivemind.utils import get_dht_time
from pydantic import Field, ValidationError

from dht.records import SwarmDHT, _entries
from dht.schemas import PROTOCOL_VERSION, FrozenModel

__all__ = ["BAN_TTL", "BanReport", "bans_key", "report_ban", "banned_peers"]

logger = logging.getLogger(__name__)

BAN_TTL = 24 * 3600.0


class BanReport(FrozenModel):
    """``peer_id`` returned outputs of ``stage`` that other replicas contradict (``reason`` says how
    much; ``evidence`` is the sha256 of the inputs the replicas disagreed on)."""

    version: int = PROTOCOL_VERSION
    peer_id: str = Field(min_length=1, max_length=128)
    stage: int = Field(ge=0)
    reason: str = Field(max_length=300)
    reporter: str = Field(min_length=1, max_length=128)
    evidence: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    at: float = 0.0
    access_token: str | None = Field(None, max_length=4096, description="run key token (keyed runs only)")


def bans_key(run_id: str) -> str:
    return f"{run_id}_bans"


async def report_ban(dht: SwarmDHT, report: BanReport, ttl: float = BAN_TTL) -> bool:
    """Publish ``report`` signed by ``dht``'s key (see the module docstring for the subkey)."""
    subkey = report.peer_id.encode() + dht._signer.local_public_key
    return await dht.dht.store(bans_key(dht.run_id), report.model_dump(mode="json"),
                               expiration_time=get_dht_time() + ttl, subkey=subkey, return_future=True)


async def banned_peers(dht: SwarmDHT) -> dict[str, BanReport]:
    """The run's reported peers and the first valid report of each."""
    found = await dht.dht.get(bans_key(dht.run_id), latest=True, return_future=True)
    reports: dict[str, BanReport] = {}
    for entry in _entries(found):
        try:
            report = BanReport.model_validate(entry.value)
        except ValidationError:
            continue  # the schema validator refuses these on store; a stale node may still hold one
        reports.setdefault(report.peer_id, report)
    return reports
