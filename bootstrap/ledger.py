"""The bootstrap's side of the contribution ledger: check what peers submit, keep it, tally it.

``LedgerBook`` holds every accepted entry in ``<state_dir>/<run>/ledger.jsonl`` (re-verified when a
restarted bootstrap loads it) and accepts a peer's new entries only if they continue that peer's
chain with valid signatures. ``LedgerService`` serves ``swarm.ledger.submit | fetch | tally``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from peers.ledger import (
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
from peers.protocol import error_reply, ok_reply
from peers.transport import CALLER, Handler, Transport
from swarm.errors import AuthRejected, BadRequest, ConfigError, SwarmError

__all__ = ["LedgerBook", "LedgerService"]

logger = logging.getLogger(__name__)


class LedgerBook:
    """Every verified entry the bootstrap accepted, per chain, persisted as JSON lines."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: list[LedgerEntry] = read_entries(path) if path.is_file() else []
        check = verify_entries(self.entries)
        if not check.ok:
            raise ConfigError(f"{path} fails verification at line {check.bad_index + 1}: {check.reason}")
        self._last: dict[tuple[str, str], LedgerEntry] = {}
        for entry in self.entries:
            self._last[(entry.peer_id, entry.public_key)] = entry

    def next_seq(self, entry: LedgerEntry) -> int:
        last = self._last.get((entry.peer_id, entry.public_key))
        return last.seq + 1 if last else 0

    def submit(self, entries: list[LedgerEntry], *, caller: str | None = None) -> SubmitResponse:
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
        fresh = [e for e in entries if e.seq >= expected]
        if not fresh:
            return SubmitResponse(accepted=0, next_seq=expected)
        check = verify_chain(fresh, start=self._last.get(chain))
        good = fresh[: check.bad_index] if not check.ok else fresh
        self._append(good)
        return SubmitResponse(accepted=len(good), next_seq=self.next_seq(entries[0]), reason=check.reason)

    def _append(self, entries: list[LedgerEntry]) -> None:
        if not entries:
            return
        with self.path.open("a") as f:
            f.writelines(e.model_dump_json() + "\n" for e in entries)
        self.entries.extend(entries)
        self._last[(entries[-1].peer_id, entries[-1].public_key)] = entries[-1]

    def tally(self) -> dict[str, dict[str, int]]:
        return tally(self.entries)

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
        return {LEDGER_SUBMIT: self._guarded(self.rpc_submit), LEDGER_FETCH: self._guarded(self.rpc_fetch),
                LEDGER_TALLY: self._guarded(self.rpc_tally)}

    async def rpc_submit(self, message: Any) -> dict:
        entries = list(parse_ledger_request(SubmitRequest, message).entries)
        response = self.book.submit(entries, caller=CALLER.get())
        logger.info("ledger: %d of %d entries accepted from %s", response.accepted, len(entries),
                    entries[0].peer_id[-12:])
        return ok_reply(response)

    async def rpc_fetch(self, message: Any) -> dict:
        request = parse_ledger_request(FetchRequest, message)
        entries = self.book.entries[request.offset : request.offset + request.limit]
        return ok_reply(FetchResponse(entries=entries, total=len(self.book.entries)))

    async def rpc_tally(self, message: Any) -> dict:
        parse_ledger_request(TallyRequest, message)
        return ok_reply(TallyResponse(peers=self.book.tally(), delegates=self.book.delegates()))

    def _guarded(self, rpc) -> Handler:
        async def handler(message: Any, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
            try:
                return await rpc(message), []
            except SwarmError as e:
                logger.info("%s refused: %s", rpc.__name__, e)
                return error_reply(e), []
            except Exception as e:  # a bug costs one request, never the bootstrap
                logger.exception("%s failed", rpc.__name__)
                return error_reply(SwarmError(f"internal error in {rpc.__name__}: {type(e).__name__}")), []

        return handler

