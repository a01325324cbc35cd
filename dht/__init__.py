"""swarm's records in the DHT: schemas, keys, validators, and ``SwarmDHT`` on top of hivemind.

May import: core, shards. Imported by: net and everything above.
"""

from dht.records import MANIFEST_REFRESH, MANIFEST_TTL, SwarmDHT
from dht.schemas import (
    MAX_STAGES,
    RECORD_REFRESH,
    RECORD_TTL,
    HardwareSummary,
    LOSS_TREND_LEN,
    Manifest,
    MetricsRecord,
    MetricsRole,
    OptimizerSettings,
    PeerRecord,
    PeerState,
    StoreRecord,
    TrainerRecord,
    manifest_key,
    telemetry_key,
    stage_key,
    store_key,
    trainers_key,
)
from core.messages import PROTOCOL_VERSION
from dht.validators import RunSchemaValidator

__all__ = [
    "MANIFEST_TTL",
    "MANIFEST_REFRESH",
    "MAX_STAGES",
    "PROTOCOL_VERSION",
    "RECORD_REFRESH",
    "RECORD_TTL",
    "HardwareSummary",
    "LOSS_TREND_LEN",
    "Manifest",
    "MetricsRecord",
    "MetricsRole",
    "OptimizerSettings",
    "PeerRecord",
    "PeerState",
    "RunSchemaValidator",
    "StoreRecord",
    "SwarmDHT",
    "TrainerRecord",
    "manifest_key",
    "telemetry_key",
    "stage_key",
    "store_key",
    "trainers_key",
]
