"""The bootstrap's side of the contribution ledger: check what peers submit, keep it, tally it.

``LedgerBook`` holds every accepted entry in ``<state_dir>/<run>/ledger.jsonl`` (re-verified when a
restarted bootstrap loads it) and accepts a peer's new entries only if they continue that peer's
chain with valid signatures. ``LedgerService`` serves ``swarm.ledger.submit | fetch | tally``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

from peers.accounting.ledger import (
    append_lines,
    LEDGER_FETCH,
    LEDGER_SUBMIT,
    LEDGER_TALLY,
    FetchRequest,
    FetchResponse,
    LedgerEntry,
    SubmitRequest,
    SubmitResponse,
    TallyRequest,
    TallyResponse,
    delegated_tally,
    read_entries,
    tally,
    verify_chain,
    parse_ledger_request,
    verify_entries,
)
from bootstrap.credit import admit
from net.rpc import guarded, ok_reply
from net.transport import CALLER, Handler, Transport
from core.errors import AuthRejected, BadRequest, ConfigError
from core.types import PeerId

__all__ = ["LedgerBook", "LedgerService"]

logger = logging.getLogger(__name__)


class LedgerBook:
    """Every verified entry the bootstrap accepted, per chain, persisted as JSON lines.

    ``cap(peer_id)``: the most tokens the peer's chains may hold together (``bootstrap.credit``;
    None: no cap). Entries past it are refused and ``audit(actor, action, detail)``-ed under the
    submitting peer's name (``ledger.refused``), once per refused entry."""

    def __init__(self, path: Path, *, cap: Callable[[str], int] | None = None,
                 audit: Callable[[str, str, str], None] | None = None):
        self.path, self.cap, self.audit = path, cap, audit
        self._refused: dict[tuple[str, str], int] = {}  # chain -> seq of the refused entry last audited
        self.entries: list[LedgerEntry] = read_entries(path) if path.is_file() else []
        check = verify_entries(self.entries)
        if not check.ok:
            raise ConfigError(f"{path} fails verification at line {check.bad_index + 1}: {check.reason}")
        self._last: dict[tuple[str, str], LedgerEntry] = {}
        self.banned: set[str] = set()  # peers reported for wrong results (``bootstrap.bans``): no more credit
        self._credited: dict[str, int] = {}  # peer id -> tokens its accepted entries claim
        for entry in self.entries:
            self._last[(entry.peer_id, entry.public_key)] = entry
            self._credited[entry.peer_id] = self._credited.get(entry.peer_id, 0) + entry.tokens

    def next_seq(self, entry: LedgerEntry) -> int:
        last = self._last.get((entry.peer_id, entry.public_key))
        return last.seq + 1 if last else 0

    def submit(self, entries: list[LedgerEntry], *, caller: PeerId | None = None) -> SubmitResponse:
        """Accept the entries that continue their chain; skip ones already held; refuse the rest.
        ``caller`` (the libp2p-authenticated submitter, when known) must be the chain's peer: only a
        peer itself can add work to its name, so a delegate (or anyone) cannot submit receipts
        signed with its own key as a delegator's."""
        chain = (entries[0].peer_id, entries[0].public_key)
        if any((e.peer_id, e.public_key) != chain for e in entries):
            raise BadRequest("one submit carries one chain (one peer id and key)")
        if caller is not None and caller != chain[0]:
            raise AuthRejected(f"peer {caller[-12:]} submitted entries of peer {chain[0][-12:]}: "
                               "a peer submits only its own ledger")
        expected = self.next_seq(entries[0])
        if chain[0] in self.banned:
            return SubmitResponse(accepted=0, next_seq=expected, reason="this peer is banned from the run")
        fresh = [e for e in entries if e.seq >= expected]
        if not fresh:
            return SubmitResponse(accepted=0, next_seq=expected)
        check = verify_chain(fresh, start=self._last.get(chain))
        good = fresh[: check.bad_index] if not check.ok else fresh
        good, over = self._within_cap(chain, good)
        self._append(good)
        return SubmitResponse(accepted=len(good), next_seq=self.next_seq(entries[0]), reason=over or check.reason)

    def _within_cap(self, chain: tuple[str, str], entries: list[LedgerEntry]) -> tuple[list[LedgerEntry], str]:
        """The entries that fit the peer's credit cap, and why the first one that does not is refused."""
        if self.cap is None or not entries:
            return entries, ""
        fits, reason = admit([e.tokens for e in entries], self._credited.get(chain[0], 0), self.cap(chain[0]))
        if fits < len(entries) and self._refused.get(chain) != entries[fits].seq:
            self._refused[chain] = entries[fits].seq  # a chain resubmits every window: audit it once
            logger.warning("ledger: refused entry %d of %s: %s", entries[fits].seq, chain[0][-12:], reason)
            if self.audit is not None:
                self.audit(chain[0], "ledger.refused", f"entry {entries[fits].seq} ({entries[fits].tokens:,} tokens, "
                           f"stage {entries[fits].stage}): {reason}")
        return entries[:fits], reason

    def _append(self, entries: list[LedgerEntry]) -> None:
        if not entries:
            return
        append_lines(self.path, [e.model_dump_json() for e in entries])  # all or none: the peer resubmits
        self.entries.extend(entries)
        for entry in entries:
            self._credited[entry.peer_id] = self._credited.get(entry.peer_id, 0) + entry.tokens
        self._last[(entries[-1].peer_id, entries[-1].public_key)] = entries[-1]

    def tally(self) -> dict[str, dict[str, int]]:
        """Verified totals per peer; a banned peer is credited nothing."""
        return {peer: row for peer, row in tally(self.entries).items() if peer not in self.banned}

    def delegates(self) -> dict[str, dict[str, int]]:
        """Per delegator, the tokens each delegate computed for it."""
        return delegated_tally(self.entries)


class LedgerService:
    """Thin handlers of the ledger RPCs over a ``LedgerBook``."""

    def __init__(self, book: LedgerBook):
        self.book = book

    async def register(self, transport: Transport) -> None:
        for method, handler in self.handlers().items():
            await transport.serve(method, handler)

    def handlers(self) -> dict[str, Handler]:
        return {LEDGER_SUBMIT: guarded(self.rpc_submit, logger), LEDGER_FETCH: guarded(self.rpc_fetch, logger),
                LEDGER_TALLY: guarded(self.rpc_tally, logger)}

    async def rpc_submit(self, message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        entries = list(parse_ledger_request(SubmitRequest, message).entries)
        response = self.book.submit(entries, caller=CALLER.get())
        logger.info("ledger: %d of %d entries accepted from %s", response.accepted, len(entries),
                    entries[0].peer_id[-12:])
        return ok_reply(response), []

    async def rpc_fetch(self, message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        request = parse_ledger_request(FetchRequest, message)
        entries = self.book.entries[request.offset : request.offset + request.limit]
        return ok_reply(FetchResponse(entries=entries, total=len(self.book.entries))), []

    async def rpc_tally(self, message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        parse_ledger_request(TallyRequest, message)
        return ok_reply(TallyResponse(peers=self.book.tally(), delegates=self.book.delegates())), []

