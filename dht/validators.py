"""Schema validation of swarm's DHT records, run alongside hivemind's RSA signature validator.

hivemind's own ``SchemaValidator`` wants pydantic v1 models with fixed field names; swarm's keys carry
the run id and a stage number, so this validator maps the hashed keys of one run to pydantic v2 models.
A record under one of those keys that does not parse is refused on store and dropped on read, so a
buggy or hostile peer cannot plant garbage where others look for routes.
"""

from __future__ import annotations

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer
from pydantic import BaseModel

from dht.schemas import (
    MAX_STAGES,
    BanReport,
    BootstrapRecord,
    Manifest,
    MetricsRecord,
    MetricsReport,
    PeerRecord,
    RunControl,
    StoreRecord,
    TrainerRecord,
    bans_key,
    data_key,
    DataRecord,
    bootstraps_key,
    control_key,
    manifest_key,
    metrics_key,
    telemetry_key,
    stage_key,
    store_key,
    trainers_key,
)

__all__ = ["RunSchemaValidator"]


class RunSchemaValidator(RecordValidatorBase):
    """Accept records under this run's keys only if they parse as the model for that key."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._models: dict[bytes, type[BaseModel]] = {
            _hashed(manifest_key(run_id)): Manifest,
            _hashed(trainers_key(run_id)): TrainerRecord,
        }
        for stage in range(MAX_STAGES):
            self._models[_hashed(stage_key(run_id, stage))] = PeerRecord
        self._models[_hashed(store_key(run_id))] = StoreRecord
        self._models[_hashed(telemetry_key(run_id))] = MetricsRecord
        self._models[_hashed(control_key(run_id))] = RunControl
        self._models[_hashed(metrics_key(run_id))] = MetricsReport
        self._models[_hashed(bootstraps_key(run_id))] = BootstrapRecord
        self._models[_hashed(bans_key(run_id))] = BanReport
        self._models[_hashed(data_key(run_id))] = DataRecord

    def validate(self, record: DHTRecord) -> bool:
        model = self._models.get(record.key)
        if model is None:
            return True  # not ours: other runs and other applications may share the DHT
        try:
            model.model_validate(MSGPackSerializer.loads(record.value))
        except Exception:  # ValidationError, or one of msgpack's several decode errors: refuse either way
            return False
        return True

    @property
    def priority(self) -> int:
        return 0  # after the signature validator (10) has stripped the signature

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if isinstance(other, RunSchemaValidator) and other.run_id == self.run_id:
            return True
        return False


def _hashed(key: str) -> bytes:
    return DHTID.generate(source=key).to_bytes()
