"""A joining peer's look for live replicas of its stage: a DHT read that misses them must not make it
start from the model files while the run has trained (it would serve stale weights)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from dht.schemas import PeerRecord, PeerState, TrainerRecord
from peers.hosting import StageHost
from core.types import LayerRange

ME, OTHER = "QmMe", "QmOther"


class _PartialDHT:
    """Answers the first ``misses`` reads of a stage with nothing, as a DHT under load can."""

    def __init__(self, misses: int, trainer_step: int):
        self.misses, self.reads = misses, 0
        self.trainers = [TrainerRecord(trainer_id="t", step=trainer_step)]

    async def stage_records(self, stage: int) -> list[PeerRecord]:
        self.reads += 1
        if self.reads <= self.misses:
            return []
        return [PeerRecord(peer_id=peer, stage=stage, layers=LayerRange(start=0, end=2), state=PeerState.ONLINE)
                for peer in (ME, OTHER)]

    async def trainer_records(self) -> list[TrainerRecord]:
        return self.trainers


@pytest.mark.parametrize(
    "misses, trainer_step, found, reads",
    [
        (0, 5, [OTHER], 1),  # found at once (itself left out)
        (2, 5, [OTHER], 3),  # a trained run: empty reads are read again
        (9, 5, [], 4),  # bounded: after 4 reads the stage has no replica
        (1, 0, [], 1),  # a new run (no trainer past step 0): no wait for the first peers
    ],
)
def test_an_empty_read_is_repeated_while_the_run_has_trained(misses, trainer_step, found, reads, monkeypatch):
    async def no_wait(seconds: float) -> None:
        return None

    monkeypatch.setattr(asyncio, "sleep", no_wait)
    dht = _PartialDHT(misses, trainer_step)
    host = SimpleNamespace(dht=dht, peer_id=ME)
    assert asyncio.run(StageHost.online_replicas(host, 0)) == found
    assert dht.reads == reads
