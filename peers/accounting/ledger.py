"""The signed contribution ledger: what a peer computed, in entries it signs and chains by hash.

Every ``window`` seconds in which it served work, a peer appends one ``LedgerEntry`` per stage: the
microbatches and tokens it processed between two optimizer steps of that stage. An entry names the
previous entry's digest (``prev``; the first names ``GENESIS``) and is signed with the peer's RSA key
(the key that signs its DHT records), so nobody can alter, drop, reorder or insert an entry without
the chain or a signature failing: ``verify_chain`` finds the first bad one, offline.

The peer keeps its chain in ``<state_dir>/<run>/ledger/<peer_id>.jsonl`` and submits new entries to
the bootstrap (``swarm.ledger.submit``), which checks them the same way before it tallies them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from pydantic import Field, ValidationError

from core.messages import FrozenModel
from net.rpc import parse_request
from core.errors import CapacityExceeded, ConfigError
from core.types import PeerId, StageIndex

__all__ = [
    "append_lines",
    "GENESIS",
    "LEDGER_VERSION",
    "LEDGER_SUBMIT",
    "LEDGER_FETCH",
    "LEDGER_TALLY",
    "LedgerEntry",
    "Work",
    "ChainCheck",
    "sign_entry",
    "verify_chain",
    "verify_entries",
    "read_entries",
    "LedgerWriter",
    "SubmitRequest",
    "SubmitResponse",
    "FetchRequest",
    "FetchResponse",
    "TallyRequest",
    "TallyResponse",
    "tally",
    "delegated_tally",
    "parse_ledger_request",
]

logger = logging.getLogger(__name__)

LEDGER_VERSION = 1
GENESIS = "0" * 64
LEDGER_SUBMIT = "swarm.ledger.submit"
LEDGER_FETCH = "swarm.ledger.fetch"
LEDGER_TALLY = "swarm.ledger.tally"
MAX_BATCH = 256
"""Entries per submit or fetch message (an entry is about 1 KiB: its public key is most of it)."""


class LedgerEntry(FrozenModel):
    """One window of one peer's work on one stage, signed by that peer."""

    version: int = LEDGER_VERSION
    seq: int = Field(ge=0)
    prev: str = Field(pattern=r"^[0-9a-f]{64}$")
    run_id: str = Field(min_length=1, max_length=64)
    peer_id: PeerId = Field(min_length=1, max_length=128)
    public_key: str = Field(min_length=1, max_length=2048, description="OpenSSH form of the signing key")
    stage: StageIndex = Field(ge=0)
    step_from: int = Field(ge=0, description="the stage's optimizer step when the window opened")
    step_to: int = Field(ge=0)
    started: float
    ended: float
    microbatches: int = Field(ge=0)
    tokens: int = Field(ge=0)
    delegate_of: PeerId | None = None
    delegate: PeerId | None = Field(None, max_length=128, description="peer id of the delegate that computed this "
                                 "work for the signer (delegation); the signer is credited")
    receipts: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="sha256 of the delegate's receipts "
                                 "this entry signs (``receipts_digest``)")
    signature: str = ""

    def signed_bytes(self) -> bytes:
        """The canonical bytes the signature covers: everything but the signature."""
        return _canonical(self._fields(exclude={"signature"}))

    def digest(self) -> str:
        """What the next entry's ``prev`` must be: the hash of this whole entry, signature included."""
        return hashlib.sha256(_canonical(self._fields())).hexdigest()

    def _fields(self, exclude: set[str] = frozenset()) -> dict:
        """The entry as JSON; the delegation fields only when set, so entries signed before they
        existed keep their signature and digest."""
        data = self.model_dump(mode="json", exclude=set(exclude))
        for name in _OPTIONAL:
            if data.get(name) is None:
                data.pop(name, None)
        return data


_OPTIONAL = ("delegate", "receipts")


def _canonical(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def sign_entry(entry: LedgerEntry, key: RSAPrivateKey) -> LedgerEntry:
    return entry.model_copy(update={"signature": key.sign(entry.signed_bytes()).decode()})


@dataclass(frozen=True)
class ChainCheck:
    """The verdict on one or more chains: ``bad_index`` is the position (in the given order) of the
    first entry that fails, with ``reason``; totals are of the entries before it."""

    entries: int
    chains: int
    bad_index: int | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.bad_index is None


def verify_chain(entries: Sequence[LedgerEntry], *, start: LedgerEntry | None = None) -> ChainCheck:
    """Check one peer's chain: consecutive ``seq``, each ``prev`` the digest of the entry before,
    one key and peer id throughout, every signature valid. ``start`` is the entry the chain
    continues from (the bootstrap's last accepted one), if any."""
    before = start
    keys: dict[str, RSAPublicKey | None] = {}
    for index, entry in enumerate(entries):
        why = _link_problem(before, entry)
        if why is None:
            if entry.public_key not in keys:
                keys[entry.public_key] = _public_key(entry.public_key)
            key = keys[entry.public_key]
            if key is None:
                why = "its public key cannot be read"
            elif not key.verify(entry.signed_bytes(), entry.signature.encode()):
                why = "its signature does not match its content (altered, or signed by another key)"
        if why is not None:
            return ChainCheck(index, 1, index, f"entry seq {entry.seq} of peer {entry.peer_id[-12:]}: {why}")
        before = entry
    return ChainCheck(len(entries), 1 if entries else 0)


def _link_problem(before: LedgerEntry | None, entry: LedgerEntry) -> str | None:
    if before is None:
        if entry.seq != 0:
            return "a chain must start at seq 0 (its first entries are missing)"
        return None if entry.prev == GENESIS else "the first entry of a chain must have prev = GENESIS"
    if (entry.peer_id, entry.public_key) != (before.peer_id, before.public_key):
        return "it changes peer id or key in the middle of a chain"
    if entry.seq != before.seq + 1:
        return f"seq should be {before.seq + 1} (an entry is missing, repeated or reordered)"
    if entry.prev != before.digest():
        return "prev is not the digest of the entry before it (that one was altered, or this one moved)"
    return None


def _public_key(text: str) -> RSAPublicKey | None:
    try:
        return RSAPublicKey.from_bytes(text.encode())
    except Exception:  # cryptography raises ValueError / UnsupportedAlgorithm for garbage keys
        return None


def verify_entries(entries: Sequence[LedgerEntry]) -> ChainCheck:
    """Check a mix of chains (a bootstrap's whole ledger): each (peer, key) chain on its own, in
    order; the first bad entry is reported by its position in ``entries``."""
    chains: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, entry in enumerate(entries):
        chains[(entry.peer_id, entry.public_key)].append(index)
    first_bad: tuple[int, str] | None = None
    for positions in chains.values():
        check = verify_chain([entries[i] for i in positions])
        if not check.ok and (first_bad is None or positions[check.bad_index] < first_bad[0]):
            first_bad = (positions[check.bad_index], check.reason)
    if first_bad is None:
        return ChainCheck(len(entries), len(chains))
    return ChainCheck(first_bad[0], len(chains), first_bad[0], first_bad[1])


def read_entries(path: Path) -> list[LedgerEntry]:
    """Entries of a JSON-lines ledger file; a line that is not an entry is a ``ConfigError`` naming it."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read ledger {path}: {e.strerror}") from None
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entries.append(LedgerEntry.model_validate_json(line))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "line"
            raise ConfigError(f"{path}:{number} is not a ledger entry: {where}: {first['msg']}") from None
    return entries


@dataclass
class Work:
    """Work on one stage within the open window."""

    microbatches: int = 0
    tokens: int = 0
    step_from: int = 0


class LedgerWriter:
    """Appends a peer's signed entries to its chain file; continues the chain found there."""

    def __init__(self, path: Path, *, key: RSAPrivateKey, run_id: str, peer_id: PeerId,
                 delegate_of: PeerId | None = None):
        self.path, self.key, self.run_id, self.peer_id = path, key, run_id, peer_id
        self.delegate_of = delegate_of
        self.public_key = key.get_public_key().to_bytes().decode()
        self.entries: list[LedgerEntry] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            self.entries = [e for e in read_entries(path) if e.public_key == self.public_key]

    def append(self, stage: StageIndex, work: Work, step_to: int, started: float, ended: float, *,
               delegate: PeerId | None = None, receipts: str | None = None) -> LedgerEntry:
        """Sign and keep one entry; ``delegate`` / ``receipts`` for work a delegate did for this peer."""
        last = self.entries[-1] if self.entries else None
        entry = sign_entry(LedgerEntry(
            seq=last.seq + 1 if last else 0, prev=last.digest() if last else GENESIS, run_id=self.run_id,
            peer_id=self.peer_id, public_key=self.public_key, stage=stage, step_from=work.step_from,
            step_to=max(step_to, work.step_from), started=started, ended=ended,
            microbatches=work.microbatches, tokens=work.tokens, delegate_of=self.delegate_of,
            delegate=delegate, receipts=receipts,
        ), self.key)
        append_lines(self.path, [entry.model_dump_json()])
        self.entries.append(entry)
        return entry

    def since(self, seq: int, limit: int = MAX_BATCH) -> list[LedgerEntry]:
        """Entries from ``seq`` on (what the bootstrap has not accepted yet), at most ``limit``."""
        first = next((i for i, e in enumerate(self.entries) if e.seq >= seq), len(self.entries))
        return self.entries[first : first + limit]


class SubmitRequest(FrozenModel):
    """New entries of one peer's chain, in order, continuing what the bootstrap already holds."""

    version: int = LEDGER_VERSION
    entries: list[LedgerEntry] = Field(min_length=1, max_length=MAX_BATCH)


class SubmitResponse(FrozenModel):
    version: int = LEDGER_VERSION
    accepted: int
    next_seq: int = Field(description="the seq the bootstrap expects next from this chain")
    reason: str = ""


class FetchRequest(FrozenModel):
    version: int = LEDGER_VERSION
    offset: int = Field(0, ge=0)
    limit: int = Field(MAX_BATCH, ge=1, le=MAX_BATCH)


class FetchResponse(FrozenModel):
    version: int = LEDGER_VERSION
    entries: list[LedgerEntry]
    total: int


class TallyRequest(FrozenModel):
    version: int = LEDGER_VERSION


class TallyResponse(FrozenModel):
    """Verified totals per peer id: ``{peer_id: {"entries", "microbatches", "tokens"}}``, and per
    delegator the tokens each of its delegates computed: ``{delegator: {delegate: tokens}}``."""

    version: int = LEDGER_VERSION
    peers: dict[str, dict[str, int]]
    delegates: dict[str, dict[str, int]] = Field(default_factory=dict)


def tally(entries: Iterable[LedgerEntry]) -> dict[str, dict[str, int]]:
    """Totals per signer: an entry is credited to the peer that signed it. Work a delegate did for a
    delegator is signed, and so credited, by the delegator (``delegate`` notes who computed it);
    ``delegate_of``, which any signer could set, credits nobody else."""
    totals: dict[str, dict[str, int]] = {}
    for entry in entries:
        row = totals.setdefault(entry.peer_id, {"entries": 0, "microbatches": 0, "tokens": 0})
        row["entries"] += 1
        row["microbatches"] += entry.microbatches
        row["tokens"] += entry.tokens
    return totals


def delegated_tally(entries: Iterable[LedgerEntry]) -> dict[str, dict[str, int]]:
    """Tokens per delegator and delegate, from the entries delegators signed."""
    totals: dict[str, dict[str, int]] = {}
    for entry in entries:
        if entry.delegate:
            row = totals.setdefault(entry.peer_id, {})
            row[entry.delegate] = row.get(entry.delegate, 0) + entry.tokens
    return totals



def parse_ledger_request(model: type[FrozenModel], payload: object) -> FrozenModel:
    """Validate a ledger RPC request (versioned on its own, apart from the stage protocol)."""
    return parse_request(model, payload, version=LEDGER_VERSION, protocol="ledger protocol")


def append_lines(path: Path, lines: list[str]) -> None:
    """Append ``lines`` to a JSON-lines file, all or nothing: on a full disk or a read-only file the
    file is cut back to what it held (never half a line, which would make the whole file unreadable)
    and ``CapacityExceeded`` says why."""
    size = path.stat().st_size if path.exists() else 0
    try:
        with path.open("a") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise CapacityExceeded(f"cannot append to {path}: {e.strerror or e}") from None
