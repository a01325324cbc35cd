"""``SharedLocalParts``: the state of a trainer's local parts (embeddings, final norm, LM head) as it
leaves the trainer, and as another trainer's enters it.

Only trainers hold these parameters, so they are the only place to get them from: a trainer joining
a run takes the others' current copy (with AdamW's state of it) before its first batch and shares its
own with later joiners (hivemind's state sharing, ``HivemindGradientSync``); ``swarm export`` finds
them in the run's checkpoint stores, where ``upload`` sends them; ``save_pretrained`` writes them next
to every stage's weights. ``lock`` keeps a copy from being taken while the optimizer updates them.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch

from dht.records import SwarmDHT
from peers.state.snapshot import StateIdentity, StateMeta, apply_state, capture_state, check_state, parameters_of
from peers.state.store_client import StoreClient
from peers.training.averaging import HivemindGradientSync
from shards.local import LocalParts
from shards.source import resolve_model
from core.errors import StateMismatch
from core.loop import LoopThread
from trainer.pipeline import RemotePipeline

__all__ = ["SharedLocalParts"]

logger = logging.getLogger(__name__)


class SharedLocalParts:
    """Copies of ``local`` in and out, identified by the run of ``pipeline`` and numbered by its step;
    network calls run on ``runner``. ``adopted``: the state taken from another trainer at join (its
    AdamW state goes into the optimizer made later); ``optimizer``: the one whose state is shared."""

    def __init__(self, local: LocalParts, pipeline: RemotePipeline, runner: LoopThread):
        self.local = local
        self.pipeline = pipeline
        self.lock = threading.Lock()  # a copy of the local parts is never taken mid-update
        self.adopted: tuple[StateMeta, dict[str, torch.Tensor]] | None = None  # local parts taken at join
        self.optimizer: torch.optim.Optimizer | None = None
        self._runner = runner

    @property
    def identity(self) -> StateIdentity:
        return StateIdentity(run_id=self.pipeline.manifest.run_id, config_hash=self.pipeline.manifest.config_hash)

    def catch_up(self, dht: SwarmDHT, trainer_sync: HivemindGradientSync, attempts: int = 3) -> None:
        """A trainer joining a run that other trainers already train takes their current local parts
        (embeddings, final norm, head, and AdamW's state of them) before its first batch: from then on
        it sums the same gradients into the same weights. Then it shares its own with later joiners."""
        me = self.pipeline.coordinator.me
        others = [r for r in self._runner.run(dht.trainer_records()) if r.online and r.trainer_id != me]
        for _ in range(attempts if others else 0):
            got = trainer_sync.load_state(timeout=60.0)
            if got is None:
                logger.warning("no other trainer handed over the local parts: starting from the model files "
                               "(this trainer's embeddings and head will differ from theirs)")
                break
            meta = self.take(*got)
            run_step = max((r.step for r in self._runner.run(dht.trainer_records()) if r.online), default=0)
            logger.info("took the local parts of step %d from another trainer (the run is at step %d)",
                        meta.step, run_step)
            if meta.step >= run_step:
                break
        if self.adopted is not None:  # the others wait for this trainer's batches from this step on
            self._runner.run(self.pipeline.coordinator.start(self.pipeline.step))
        trainer_sync.share_state(self.shared)

    def take(self, metadata: Any, tensors: list[torch.Tensor]) -> StateMeta:
        """Load another trainer's local parts (as ``shared`` sends them) into ``local``, after checking
        they are of this run and model (``StateMismatch`` if not); the step moves up to theirs."""
        if not isinstance(metadata, dict) or not isinstance(metadata.get("names"), list):
            raise StateMismatch(f"another trainer's local parts came with unreadable metadata: {metadata!r:.200}")
        meta = StateMeta.model_validate(metadata.get("meta"))
        named = dict(zip(metadata["names"], tensors))
        check_state(meta, named, self.local, identity=self.identity, stage=None, layers=None, need_optimizer=False)
        with torch.no_grad(), self.lock:
            for name, param in parameters_of(self.local).items():
                param.copy_(named[f"param/{name}"])
        self.adopted = (meta, named)
        self.pipeline.step = max(self.pipeline.step or 0, meta.step)
        return meta

    def shared(self) -> tuple[dict, list[torch.Tensor]]:
        """What a trainer joining later downloads (through hivemind's state sharing): the local parts
        and their AdamW state, as of the step this trainer is at."""
        with self.lock:
            meta, tensors = capture_state(self.local, self.optimizer, identity=self.identity,
                                          step=self.pipeline.step or 0)
        names = list(tensors)
        return {"meta": meta.model_dump(mode="json"), "names": names}, [tensors[n] for n in names]

    def adopt_into(self, optimizer: torch.optim.Optimizer) -> None:
        """Give ``optimizer`` the AdamW state taken at join, if it came with one; from then on its
        state is the one shared."""
        if self.adopted is not None and self.adopted[0].with_optimizer:
            meta, named = self.adopted
            with self.lock:
                apply_state(self.local, optimizer, meta, named, identity=self.identity)
        self.optimizer = optimizer

    def state(self, step: int) -> tuple[StateMeta, dict[str, torch.Tensor]]:
        """A copy of the local parts' weights (embeddings, final norm, head) as a state of ``step``."""
        return capture_state(self.local, None, identity=self.identity, step=step)

    def upload(self, step: int, dht: SwarmDHT) -> int:
        """Send the weights to the run's checkpoint stores (found through ``dht``); returns how many
        stores took the upload (0 when they already held this step)."""
        meta, tensors = self.state(step)
        return self._runner.run(self._store(dht).put(meta, tensors))

    def save_pretrained(self, directory: str | Path, dht: SwarmDHT) -> Path:
        """Write the whole model as a standard HF checkpoint: every stage's current weights from an
        online replica (the stores' copy otherwise), the local parts from here."""
        from trainer.export import gather_stage, weights_of, write_checkpoint

        manifest, store = self.pipeline.manifest, self._store(dht)
        stages = []
        for stage in range(manifest.num_stages):
            records = self._runner.run(dht.stage_records(stage))
            weights, where = self._runner.run(gather_stage(manifest, stage, records, self.pipeline.client, store))
            logger.info("stage %d weights from %s", stage, where)
            stages.append(weights)
        source = resolve_model(manifest.model)
        return write_checkpoint(manifest, source, stages, weights_of(*self.state(0)), Path(directory))

    def _store(self, dht: SwarmDHT) -> StoreClient:
        # the pipeline's transport: on a keyed run it presents this trainer's token (the store is gated)
        return StoreClient(self.pipeline.client.transport, dht.stores)
