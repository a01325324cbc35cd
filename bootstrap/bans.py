"""The bootstrap's side of the run's ban reports (``dht.bans``): a reported peer earns nothing more
and, on a keyed run, loses the API key it joined with.

Every metrics round the bootstrap reads ``{run}_bans``. For each newly reported peer it withholds
credit (the ledger book accepts no more entries of its chains and leaves it out of the tally) and
audits the report (``peer.banned``, actor ``ban:<reporter>``). On a keyed run it finds the key the peer
joined with from the access token in the peer's own signed stage records and revokes that key, so the
gates drop the peer and the DHT refuses its records, as for any revoked key. Any holder of a run key can
report; every report and revocation is audited, so the owner sees who banned whom.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from hivemind.utils.crypto import RSAPublicKey

from bootstrap.ledger import LedgerBook
from bootstrap.state import StateDB
from dht.auth import verify_token
from dht.bans import BanReport, banned_peers
from dht.records import SwarmDHT
from swarm.errors import SwarmError

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

    async def check_once(self) -> list[str]:
        """Apply the reports not applied yet; returns the peers newly banned."""
        reports = await banned_peers(self.dht)
        fresh = {peer: r for peer, r in reports.items() if peer not in self.handled}
        for peer, report in sorted(fresh.items()):
            self.book.banned.add(peer)
            detail = f"stage {report.stage}: {report.reason}"
            await asyncio.to_thread(self.db.audit, f"ban:{report.reporter}", "peer.banned", f"{peer} ({detail})")
            logger.warning("peer %s is banned from the run by %s: %s", peer[-8:], report.reporter[-8:], detail)
            await self._revoke_key_of(peer, report)
            self.handled[peer] = report
        return sorted(fresh)

    async def _revoke_key_of(self, peer: str, report: BanReport) -> None:
        authority = self._authority()
        if authority is None:
            return
        key_id = await self._key_of(peer, authority)
        if key_id is None:
            logger.warning("banned peer %s: no token of it found in the DHT, its key stays", peer[-8:])
            return
        try:
            await asyncio.to_thread(self.db.revoke_key, key_id, actor=f"ban:{report.reporter}")
        except SwarmError as e:  # already revoked, or deleted: nothing more to take away
            logger.info("revoking key %s of banned peer %s: %s", key_id, peer[-8:], e)

    async def _key_of(self, peer: str, authority: RSAPublicKey) -> str | None:
        """The key id in the access token of one of ``peer``'s own stage records."""
        records = await self.dht.all_records(self.num_stages)
        for record in (r for found in records.values() for r in found if r.peer_id == peer and r.access_token):
            try:
                return verify_token(record.access_token, authority).key_id
            except SwarmError:
                continue
        return None
