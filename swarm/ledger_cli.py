"""`swarm ledger verify <file-or-addr>`: read a ledger (a file, or everything a bootstrap holds) and
check it offline: every chain link and every signature, naming the first bad entry."""

from __future__ import annotations

import asyncio
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from peers.accounting.ledger import (
    LEDGER_FETCH,
    FetchRequest,
    FetchResponse,
    LedgerEntry,
    read_entries,
    tally,
    verify_entries,
)
from core.config import SwarmSettings
from core.errors import ConfigError

__all__ = ["load_ledger", "fetch_ledger", "report_check"]

FETCH_TIMEOUT = 30.0
MAX_PAGES = 10_000


def load_ledger(source: str, settings: SwarmSettings) -> tuple[list[LedgerEntry], str]:
    """Entries from a file, or fetched from the bootstrap at multiaddr ``source`` (on a keyed run with
    ``settings.key``: the bootstrap serves its ledger to key holders only)."""
    path = Path(source)
    if path.exists():
        return read_entries(path), str(path)
    if source.startswith("/") and "/p2p/" in source:
        from dht.records import SwarmDHT  # hivemind and torch: only when the ledger is remote

        dht = SwarmDHT.create_client(settings.run_id, [source])
        try:
            return asyncio.run(fetch_ledger(dht, source.rsplit("/p2p/", 1)[1], key=settings.key)), source
        finally:
            dht.shutdown()
    raise ConfigError(f"{source!r} is neither a ledger file nor a multiaddr /ip4/HOST/tcp/PORT/p2p/PEER_ID")


async def fetch_ledger(dht, bootstrap_id: str, *, key: str | None = None) -> list[LedgerEntry]:
    """Every entry the bootstrap holds (``dht``: a ``SwarmDHT`` client), page by page (bounded)."""
    from net.auth import ClientCalls
    from net.rpc import parse_reply

    client = await ClientCalls.open(dht, key)
    entries: list[LedgerEntry] = []
    try:
        for _ in range(MAX_PAGES):
            message = FetchRequest(offset=len(entries))
            reply, _ = await client.calls.call(bootstrap_id, LEDGER_FETCH, message, [], timeout=FETCH_TIMEOUT)
            page = parse_reply(FetchResponse, reply)
            entries.extend(page.entries)
            if not page.entries or len(entries) >= page.total:
                break
    finally:
        await client.close()
    return entries


def report_check(entries: list[LedgerEntry], where: str, console: Console) -> int:
    """Print the verdict and the verified totals; 0 if everything checks out, else 1."""
    check = verify_entries(entries)
    good = entries if check.ok else entries[: check.bad_index]
    table = Table(title=f"verified contribution in {where}", title_justify="left")
    for column in ("peer", "entries", "microbatches", "tokens"):
        table.add_column(column, justify="left" if column == "peer" else "right")
    for peer, row in sorted(tally(good).items(), key=lambda kv: -kv[1]["tokens"]):
        table.add_row(Text(peer), f"{row['entries']:,}", f"{row['microbatches']:,}", f"{row['tokens']:,}")
    console.print(table)
    if check.ok:
        console.print(f"[green]OK[/]: {len(entries)} entries in {check.chains} chain(s); every link and "
                      "signature checks out", highlight=False)
        return 0
    console.print(f"[red]BAD[/]: entry #{check.bad_index + 1} (line {check.bad_index + 1}) fails: {escape(check.reason)}; "
                  f"the {check.bad_index} entries before it check out", highlight=False)
    return 1
