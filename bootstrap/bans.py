"""The bootstrap's side of the run's ban reports (``dht.bans``): a peer banned run-wide earns nothing
more and, on a keyed run, loses the API key it joined with.

Every metrics round the bootstrap reads ``{run}_bans`` and judges the reports (``dht.bans.judge``): a
peer is banned once ``BAN_QUORUM`` distinct reporters (distinct API keys, checked against the run's
authority, on a keyed run) report it; reports are rate-limited per reporter by the time this bootstrap
first saw them. A refused report (rate limit, a self-report, a token that does not check out, evidence
missing or inconsistent, or naming a stage the accused never served as far as the stage records this
bootstrap has read show) is audited once under its reporter (``ban.refused``): a false or flooding
reporter is named, its target is not. For each newly banned peer the bootstrap withholds credit (the
ledger book accepts no more entries of its chains and leaves it out of the tally) and audits the ban
(``peer.banned``, actor ``ban:<reporters>``); on a keyed run it finds the key the peer joined with from
the access token in the peer's own signed stage records and revokes it, so the gates drop the peer and
the DHT refuses its records, as for any revoked key. The evidence (``dht.schemas.BanEvidence``) is checked
for consistency only: the bootstrap holds no stage and cannot recompute an output, so two distinct keys
whose consistent evidence names the same accused and stage are what bans. The stages a peer served are
the ones this bootstrap has seen in its records since it started (read every round with live reports):
a peer it never saw is not checked on that point, and a report of a stage the accused left before the
bootstrap first read its records is refused.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPublicKey

from bootstrap.ledger import LedgerBook
from bootstrap.state import StateDB
from dht.auth import verify_token
from dht.schemas import BanReport
from dht.bans import all_reports, judge
from dht.records import SwarmDHT
from core.errors import SwarmError
from core.types import PeerId

__all__ = ["BanEnforcer"]

logger = logging.getLogger(__name__)


class BanEnforcer:
    """Applies the run's ban reports on this bootstrap (see the module docstring)."""

    def __init__(self, dht: SwarmDHT, db: StateDB, book: LedgerBook, num_stages: int,
                 authority: Callable[[], RSAPublicKey | None]):
        """``authority`` gives the run's authority key on a keyed run, None on an open one."""
        self.dht, self.db, self.book, self.num_stages = dht, db, book, num_stages
        self._authority = authority
        self.handled: dict[str, BanReport] = {}
        self._seen: dict[tuple[str, str], float] = {}  # (peer, reporter) -> when first read here
        self._refused: set[tuple[str, str]] = set()  # audited once each
        self.served: dict[str, set[int]] = {}  # peer -> the stages its records showed here

    async def check_once(self, now: float | None = None) -> list[str]:
        """Judge the live reports and apply the bans not applied yet; returns the peers newly banned."""
        now = get_dht_time() if now is None else now
        reports = await all_reports(self.dht)
        if reports:
            await self._note_served()
        authority = self._authority()
        seen = [self._seen.setdefault((r.peer_id, r.reporter), now) for r in reports]
        judged = judge([(r, self._identity(r, authority, at), at) for r, at in zip(reports, seen)],
                       served=self.served)
        for report, why in judged.refused:
            if (report.peer_id, report.reporter) not in self._refused:
                self._refused.add((report.peer_id, report.reporter))
                logger.warning("ban report of %s by %s refused: %s", report.peer_id[-8:], report.reporter[-8:], why)
                await asyncio.to_thread(self.db.audit, report.reporter, "ban.refused", f"{report.peer_id}: {why}")
        fresh = sorted(peer for peer in judged.banned if peer not in self.handled)
        for peer in fresh:
            report = next(r for r in reports if r.peer_id == peer)
            reporters = sorted({r.reporter for r in reports if r.peer_id == peer})
            self.book.banned.add(peer)
            detail = f"stage {report.stage}: {report.reason}; reported by {len(judged.banned[peer])} keys"
            actor = f"ban:{','.join(reporters)}"
            await asyncio.to_thread(self.db.audit, actor, "peer.banned", f"{peer} ({detail})")
            logger.warning("peer %s is banned from the run by %s: %s", peer[-8:], actor, detail)
            await self.revoke_key_of(peer, actor)
            self.handled[peer] = report
        return fresh

    async def _note_served(self) -> None:
        """Adds the stages the live stage records show to ``served`` (it only grows: a liar that moves
        to another stage after being caught is still known to have served the first)."""
        records = await self.dht.all_records(self.num_stages)
        for stage, found in records.items():
            for record in found:
                self.served.setdefault(record.peer_id, set()).add(stage)

    @staticmethod
    def _identity(report: BanReport, authority: RSAPublicKey | None, seen: float) -> str | None:
        """The reporter's API key id (keyed run: its token must check out, when the report was first
        seen here, and be its own), else its peer id."""
        if authority is None:
            return report.reporter
        try:
            claims = verify_token(report.access_token or "", authority, now=seen)
        except SwarmError:
            return None
        return claims.key_id if claims.peer_id == report.reporter else None

    async def revoke_key_of(self, peer: PeerId, actor: str) -> str | None:
        """Revoke the key ``peer`` joined with (a keyed run); returns its id, None if none was found."""
        authority = self._authority()
        if authority is None:
            return None
        key_id = await self._key_of(peer, authority)
        if key_id is None:
            logger.warning("peer %s: no token of it found in the DHT, its key stays", peer[-8:])
            return None
        try:
            await asyncio.to_thread(self.db.revoke_key, key_id, actor=actor)
        except SwarmError as e:  # already revoked, or deleted: nothing more to take away
            logger.info("revoking key %s of peer %s: %s", key_id, peer[-8:], e)
        return key_id

    async def _key_of(self, peer: PeerId, authority: RSAPublicKey) -> str | None:
        """The key id in the access token of one of ``peer``'s own stage records."""
        records = await self.dht.all_records(self.num_stages)
        for record in (r for found in records.values() for r in found if r.peer_id == peer and r.access_token):
            try:
                return verify_token(record.access_token, authority).key_id
            except SwarmError:
                continue
        return None
