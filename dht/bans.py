"""Signed reports of peers caught returning wrong results, under ``{run}_bans``.

A trainer whose spot check caught a peer (``trainer.spotcheck``) publishes a ``BanReport``: the subkey is
``<banned peer id> + the reporter's owner marker`` (hivemind's ``RSASignatureValidator``), so a report
is signed by its reporter, nobody else can overwrite or withdraw it, and one reporter may ban several
peers. Trainers leave the reported peers out of their routes, peers do not take a stage's state from
them, and the bootstrap revokes the API key a reported peer joined with (keyed runs) and credits it
nothing more. On keyed runs the key is token-gated like the stage records (``dht.auth``), so only a
holder of a run key can report. Reports live ``BAN_TTL`` (a day): a banned machine may rejoin with a
new key after that, and the run owner can lift nothing earlier than by restarting with a new run id.

**A ban needs a quorum** (issue 22): a peer counts as banned run-wide only when at least
``BAN_QUORUM`` (2) distinct reporters have a live report against it (``judge``). Distinct means distinct
API keys on a keyed run (the key id in each report's access token: one key holder running several
peer ids counts once), distinct reporter peer ids on an open run (which has no identities to count, so
there the quorum only raises the cost of a framing). Each reporter may have ``REPORTS_PER_HOUR`` (10)
reports counted per hour; the ones beyond, a report of the reporter itself, and one whose reporter's
identity cannot be established are refused (the bootstrap audits them under the reporter,
``bootstrap.bans``). The window is the reports' lifetime in the DHT.

**A report carries the spot check's evidence** (``BanEvidence``, issue 22): the inputs' digest, the
accused's, the honest replica's and the third replica's output digests, the two witnesses and the gap
measured, inside the report's value and so signed by the reporter's own DHT key. Nobody who judges a
report holds the stage (the bootstrap holds none), so nobody can recompute an output: ``judge`` checks
that the evidence is there and consistent (``evidence_problem``) and refuses the report otherwise, and
the quorum's reports must name the same accused and stage. A consistent fake is as easy to sign as the
truth, so the quorum of distinct keys is what stands against framing; the evidence makes each report
say exactly what it claims, and a careless or inconsistent one is refused and named. A trainer that
catches a liar stops routing to it at once (its own ban, ``trainer.pipeline``); the run-wide ban waits
for a second reporter.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Collection, Mapping, Sequence

from hivemind.utils import get_dht_time
from pydantic import ValidationError

from dht.auth import token_key_id
from dht.control import get_control
from dht.records import SwarmDHT, _entries
from dht.schemas import BanReport, bans_key

__all__ = ["BAN_TTL", "BAN_QUORUM", "REPORTS_PER_HOUR", "Judgement", "evidence_problem", "judge", "report_ban",
           "all_reports", "banned_peers", "excluded_peers"]

logger = logging.getLogger(__name__)

BAN_TTL = 24 * 3600.0
BAN_QUORUM = 2
REPORTS_PER_HOUR = 10
_HOUR = 3600.0


async def report_ban(dht: SwarmDHT, report: BanReport, ttl: float = BAN_TTL) -> bool:
    """Publish ``report`` signed by ``dht``'s key (see the module docstring for the subkey)."""
    subkey = report.peer_id.encode() + dht._signer.local_public_key
    return await dht.dht.store(bans_key(dht.run_id), report.model_dump(mode="json"),
                               expiration_time=get_dht_time() + ttl, subkey=subkey, return_future=True)


async def all_reports(dht: SwarmDHT) -> list[BanReport]:
    """Every valid live report of the run (one per reported peer and reporter key)."""
    found = await dht.dht.get(bans_key(dht.run_id), latest=True, return_future=True)
    reports: list[BanReport] = []
    for entry in _entries(found):
        try:
            reports.append(BanReport.model_validate(entry.value))
        except ValidationError:
            continue  # the schema validator refuses these on store; a stale node may still hold one
    return reports


async def banned_peers(dht: SwarmDHT, quorum: int = BAN_QUORUM) -> dict[str, BanReport]:
    """The peers banned run-wide (``judge``) and the first report of each. Reporters are told apart
    by the key id in their token (the DHT's validator checked the token on keyed runs), else by peer
    id; the rate limit counts the reports' own ``at``."""
    reports = await all_reports(dht)
    judged = judge([(r, token_key_id(r.access_token) if r.access_token else r.reporter, r.at) for r in reports],
                   quorum=quorum)
    return {peer: next(r for r in reports if r.peer_id == peer) for peer in judged.banned}


async def excluded_peers(dht: SwarmDHT) -> dict[str, BanReport | None]:
    """The peers trainers route around: those banned run-wide by their reporters (``banned_peers``)
    and those the run owner banned (the run-control record's ``banned``; no report behind those)."""
    reported, control = await asyncio.gather(banned_peers(dht), get_control(dht))
    found: dict[str, BanReport | None] = dict(reported)
    for peer in control.banned if control is not None else ():
        found.setdefault(peer, None)
    return found


@dataclass(frozen=True)
class Judgement:
    """``banned``: peer -> the distinct reporter identities that agree; ``refused``: (report, why)."""

    banned: dict[str, list[str]] = field(default_factory=dict)
    refused: list[tuple[BanReport, str]] = field(default_factory=list)


def evidence_problem(report: BanReport, served: Collection[int] | None = None) -> str | None:
    """Why ``report``'s evidence is missing or contradicts itself (None: consistent). ``served``: the
    stages the accused is known to have served (None: unknown, not checked)."""
    e, accused = report.evidence, report.peer_id
    if e is None:
        return "the report carries no evidence"
    if e.stage != report.stage:
        return f"the evidence is of stage {e.stage}, the report of stage {report.stage}"
    if accused in (e.honest_peer, e.third_peer):
        return "the accused is named as a witness"
    if e.honest_peer == e.third_peer:
        return "the honest and the third replica are the same peer"
    if e.accused_output == e.honest_output or e.max_abs_diff == 0:
        return "the accused's output is the honest one's"
    if e.third_output != e.honest_output and e.third_gap >= e.max_abs_diff:
        return "the third replica does not side with the honest one"
    if served is not None and report.stage not in served:
        return f"the accused served no stage {report.stage} as far as its records show"
    return None


def judge(reports: Sequence[tuple[BanReport, str | None, float]], *, quorum: int = BAN_QUORUM,
          limit: int = REPORTS_PER_HOUR, per: float = _HOUR,
          served: Mapping[str, Collection[int]] | None = None) -> Judgement:
    """Which peers the reports ban. Each report comes with its reporter's identity (key id; None: it
    could not be established) and when it was seen. A report is refused if it has no identity, if
    it reports its own reporter, if its evidence is missing or inconsistent (``evidence_problem``;
    ``served``: peer -> the stages its records showed, where the caller knows them), or if its
    reporter already had ``limit`` reports counted within ``per`` s before it; a peer is banned when
    ``quorum`` distinct identities report it for the same stage."""
    refused: list[tuple[BanReport, str]] = []
    counted: dict[str, list[float]] = {}
    agree: dict[tuple[str, int], set[str]] = {}
    for report, identity, seen in sorted(reports, key=lambda r: (r[2], r[0].reporter, r[0].peer_id)):
        if identity is None:
            refused.append((report, "the reporter's access token does not check out"))
        elif report.peer_id == report.reporter:
            refused.append((report, "a reporter cannot report itself"))
        elif (problem := evidence_problem(report, None if served is None else served.get(report.peer_id))):
            refused.append((report, problem))
        elif len([t for t in counted.get(identity, []) if seen - t < per]) >= limit:
            refused.append((report, f"more than {limit} reports in {per / _HOUR:g} h from key {identity}"))
        else:
            counted.setdefault(identity, []).append(seen)
            agree.setdefault((report.peer_id, report.stage), set()).add(identity)
    banned: dict[str, set[str]] = {}
    for (peer, _), ids in agree.items():
        if len(ids) >= quorum:
            banned.setdefault(peer, set()).update(ids)
    return Judgement(banned={peer: sorted(ids) for peer, ids in banned.items()}, refused=refused)
