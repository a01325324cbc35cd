"""A full disk, an expired token: each a clear error or a safe degradation, nothing already stored lost.

A full disk is simulated with a real kernel refusal: ``RLIMIT_FSIZE`` makes every write past the limit
fail with ``EFBIG`` (SIGXFSZ ignored), as a full disk fails it with ``ENOSPC``. (A read-only state dir
cannot be simulated here: the tests run as root, who writes anyway; it takes the same paths.)
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from bootstrap.ledger import LedgerBook
from dht.auth import issue_token
from peers.telemetry.activity import RequestDone
from net.auth import AuthGate
from peers.state.checkpoint_files import CheckpointDir
from peers.accounting.contribution import ContributionRecorder
from peers.accounting.ledger import LedgerWriter, Work, read_entries
from peers.state.snapshot import StateMeta
from shards import LayerRange
from net.transport import CALLER
from core.errors import AuthRejected, CapacityExceeded

PEER = "12D3KooWPeerA"


@contextlib.contextmanager
def _disk_full_past(limit: int) -> Iterator[None]:
    """Writes that would make any file larger than ``limit`` bytes fail while inside."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _meta(step: int) -> StateMeta:
    return StateMeta(run_id="r", config_hash="c", stage=0, layers=LayerRange(start=0, end=1), step=step,
                     dtype="float32")


def test_a_checkpoint_on_a_full_disk_fails_clearly_and_keeps_the_previous_ones(tmp_path: Path):
    directory = CheckpointDir(tmp_path / "stage-0", keep=2)
    small = {"param/w": torch.ones(4)}
    directory.save(_meta(1), small)
    with _disk_full_past(64 << 10), pytest.raises(CapacityExceeded, match="cannot write checkpoint step-0000000002"):
        directory.save(_meta(2), {"param/w": torch.ones(1 << 18)})  # 1 MiB
    assert directory.steps() == [1]
    meta, tensors = directory.load(1)
    assert meta.step == 1 and torch.equal(tensors["param/w"], small["param/w"])
    assert sorted(p.name for p in directory.root.iterdir()) == ["step-0000000001.json", "step-0000000001.safetensors"]


def test_the_contribution_ledger_on_a_full_disk_keeps_the_work_and_the_file_readable(tmp_path: Path):
    path = tmp_path / "peer.jsonl"
    writer = LedgerWriter(path, key=RSAPrivateKey(), run_id="r", peer_id=PEER)
    recorder = ContributionRecorder(writer, window=30, step_of=lambda stage: 0)
    recorder.observe(RequestDone("forward", 0.1, True, 0, 2, 64))
    recorder.cut()
    size = path.stat().st_size
    recorder.observe(RequestDone("forward", 0.1, True, 0, 2, 32))
    with _disk_full_past(size + 10), pytest.raises(CapacityExceeded, match="cannot append to"):
        recorder.cut()
    assert path.stat().st_size == size and len(read_entries(path)) == 1  # no half line written
    recorder.observe(RequestDone("forward", 0.1, True, 0, 2, 16))
    [entry] = recorder.cut()  # space again: the work of the failed window is in this one
    assert (entry.seq, entry.microbatches, entry.tokens) == (1, 2, 48)
    assert [e.seq for e in read_entries(path)] == [0, 1]


def test_the_bootstraps_ledger_on_a_full_disk_refuses_and_takes_the_entries_later(tmp_path: Path):
    writer = LedgerWriter(tmp_path / "peer.jsonl", key=RSAPrivateKey(), run_id="r", peer_id=PEER)
    entries = [writer.append(0, Work(microbatches=1, tokens=8), 1, 0.0, 1.0) for _ in range(3)]
    book = LedgerBook(tmp_path / "book.jsonl")
    book.submit(entries[:1])
    size = book.path.stat().st_size
    with _disk_full_past(size + 10), pytest.raises(CapacityExceeded):
        book.submit(entries[1:])
    assert len(book.entries) == 1 and book.path.stat().st_size == size
    assert book.submit(entries[1:]).accepted == 2  # the peer resubmits what was not acknowledged
    assert len(LedgerBook(book.path).entries) == 3


def test_an_expired_token_is_refused_with_a_clear_error_and_can_be_renewed():
    authority = RSAPrivateKey()
    gate = AuthGate(authority.get_public_key().to_bytes())

    async def present(expires: float):
        CALLER.set(PEER)
        return await gate.rpc_present({"token": issue_token(authority, "k1", PEER, b"key", expires)}, [])

    reply, _ = asyncio.run(present(time.time() - 1))
    assert reply["error"]["code"] == "AuthRejected" and "expired" in reply["error"]["message"]
    with pytest.raises(AuthRejected, match="present an access token first"):
        gate.check(PEER)
    reply, _ = asyncio.run(present(time.time() + 60))
    assert "ok" in reply
    gate.check(PEER)  # a renewed token lets the caller in again
