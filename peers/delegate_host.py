"""``DelegateHost``: the stages a peer hosts on delegators' behalf, as ``delegation/`` asks for them
(the ``delegation.sessions.StageHost`` interface). A hosted stage is a slot of the peer's
``StageHost`` beside its own span: served and checkpointed the same way, but announced by its
delegator (``hosted_record``) and its work reported to the session (``on_work``), not to this peer's
ledger."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Collection

import torch

from dht.schemas import PeerRecord, PeerState
from peers.telemetry.hardware import probe_hardware
from peers.hosting import StageHost
from peers.training.routing import record_loads
from peers.slot import StageSlot, WorkHook
from core.types import LayerRange, PeerId, StageIndex
from core.errors import CapacityExceeded, DelegationRefused

__all__ = ["DelegateHost"]

logger = logging.getLogger(__name__)


class DelegateHost:
    """Hosts stages for delegators in ``host``'s ``hosted`` slots."""

    def __init__(self, host: StageHost):
        self.host = host

    @property
    def peer_id(self) -> str:
        return self.host.peer_id

    async def stage_to_host(self, wanted: int | None, *, taken: Collection[int] = ()) -> int:
        """The stage a new delegation session would serve: ``wanted``, else the stage with the least
        live throughput that this peer neither serves nor hosts (nor has promised: ``taken``).
        ``DelegationRefused`` names why a stage cannot be hosted here, ``CapacityExceeded`` when memory
        is short."""
        host = self.host
        busy = set(host.slots) | set(host.hosted) | {r.stage for r in host.pending} | set(taken)
        num_stages = host.manifest.num_stages
        if wanted is None:
            records = await host.dht.all_records(num_stages)
            loads = record_loads(num_stages, records)
            free = [stage for stage in range(num_stages) if stage not in busy]
            if not free:
                raise DelegationRefused(f"peer {host.peer_id[-8:]} already serves or hosts every stage of the run")
            wanted = min(free, key=lambda stage: (loads[stage], stage))
        if wanted >= num_stages:
            raise DelegationRefused(f"stage {wanted} does not exist: the run has {num_stages} stages "
                                    f"(0 to {num_stages - 1})")
        if wanted in busy:
            raise DelegationRefused(f"peer {host.peer_id[-8:]} already serves or hosts stage {wanted}")
        used = sum(host.stage_bytes[stage] for stage in set(host.slots) | set(host.hosted))
        if used + host.stage_bytes[wanted] > host.memory:
            raise CapacityExceeded(f"stage {wanted} needs {host.stage_bytes[wanted] / 2**30:.2f} GiB; peer "
                                   f"{host.peer_id[-8:]} has {(host.memory - used) / 2**30:.2f} GiB left")
        return wanted

    async def host_stage(self, stage: StageIndex, *, on_behalf_of: str, on_work: WorkHook) -> None:
        """Load ``stage`` (its state from a live replica, else a checkpoint) and serve it for the peer
        ``on_behalf_of``: trainers reach it through that peer's record (``hosted_record``), which this
        peer does not announce itself, and its work goes to ``on_work``, not to this peer's ledger.
        A load that fails or is cancelled leaves nothing behind."""
        host = self.host
        await self.stage_to_host(stage)
        slot = StageSlot(stage, self._hosted_record(stage, on_behalf_of, PeerState.LOADING), on_work=on_work,
                         queue_size=host.settings.peer.queue_size)
        host.hosted[stage] = slot
        async with contextlib.AsyncExitStack() as undo:
            undo.push_async_callback(slot.close)
            undo.callback(host.hosted.pop, stage, None)
            await host.load_slot(slot)
            await host.adopt_state(slot)
            undo.pop_all()
        host.start_checkpoints(slot)
        slot.record = slot.record.model_copy(update={"state": PeerState.ONLINE})
        logger.info("hosting stage %d for %s", stage, on_behalf_of[-8:])

    async def release_stage(self, stage: StageIndex) -> None:
        """Stop serving a hosted stage (its session ended). Idempotent."""
        slot = self.host.hosted.pop(stage, None)
        if slot is not None:
            await slot.close()
            logger.info("released stage %d hosted for %s", stage, (slot.record.delegate_of or "?")[-8:])

    def hosted_record(self, stage: StageIndex) -> PeerRecord | None:
        """The record a hosted stage's delegator announces: this peer's address, current step, load and
        hardware (without a token: the delegator adds its own, as the signer)."""
        slot = self.host.hosted.get(stage)
        if slot is None:
            return None
        return self.host.telemetry.refresh(self.host.current_record(slot))

    def _hosted_record(self, stage: StageIndex, delegator: PeerId, state: PeerState) -> PeerRecord:
        host, m = self.host, self.host.measurement
        return PeerRecord(
            peer_id=host.peer_id, maddrs=host.dht.visible_maddrs(), stage=stage, layers=host.manifest.stages[stage],
            state=state, hardware=probe_hardware(host.device),
            throughput=m.per_stage(len(host.slots) + len(host.hosted) + 1),
            latency_ms=m.latency_ms, bandwidth_mbps=m.bandwidth_mbps, memory_gib=m.memory_gib, delegate_of=delegator,
        )

    def stage_layers(self, stage: StageIndex) -> LayerRange:
        return self.host.manifest.stages[stage]

    def gpu_count(self) -> int:
        """GPUs of this machine (NVML's count, else torch's)."""
        return max(self.host.telemetry.hardware().gpu_count, torch.cuda.device_count())

    async def serve_control(self, method: str, handler: Callable) -> None:
        """Register a handler beside the stage RPCs, behind the run's auth gate on keyed runs (the
        delegation RPCs); it is not counted as served work."""
        await self.host.transport.serve(method, handler)
