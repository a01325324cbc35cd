"""swarm's records in the DHT: schemas, keys, validators, and ``SwarmDHT`` on top of hivemind."""

from dht.records import MANIFEST_TTL, SwarmDHT
from dht.schemas import (
    MAX_STAGES,
    PROTOCOL_VERSION,
    RECORD_REFRESH,
    RECORD_TTL,
    HardwareSummary,
    Manifest,
    OptimizerSettings,
    PeerRecord,
    PeerState,
    TrainerRecord,
    manifest_key,
    stage_key,
    trainers_key,
)
from dht.validators import RunSchemaValidator

__all__ = [
    "MANIFEST_TTL",
    "MAX_STAGES",
    "PROTOCOL_VERSION",
    "RECORD_REFRESH",
    "RECORD_TTL",
    "HardwareSummary",
    "Manifest",
    "OptimizerSettings",
    "PeerRecord",
    "PeerState",
    "RunSchemaValidator",
    "SwarmDHT",
    "TrainerRecord",
    "manifest_key",
    "stage_key",
    "trainers_key",
]
