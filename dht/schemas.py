"""What swarm keeps in the DHT, and under which keys.

Records, all small (a few hundred bytes: hivemind's DHT pipe must not carry large values,
see docs/design.md):

* ``{run}_manifest``: the run's ``Manifest``, written by the bootstrap (subkey = its owner key).
* ``{run}_stage_{i}``: one ``PeerRecord`` per peer serving stage ``i`` (subkey = the peer's owner key,
  so only that peer can overwrite it), expiring ``RECORD_TTL`` seconds after it was written.
* ``{run}_trainers``: one ``TrainerRecord`` per trainer (subkey = its owner key): the collaborative
  step it works on and the sequences it has contributed to it. The run's step closes when the
  trainers' contributions to it reach the manifest's ``target_batch_size``.
* ``{run}_checkpoint_stores``: one ``StoreRecord`` per node keeping the run's checkpoints (the
  bootstrap), so peers and trainers find where to upload and restore from.
* ``{run}_telemetry``: one ``MetricsRecord`` per trainer and per peer (subkey = its owner key): what
  `swarm status` and the dashboard show about the run (step, loss trend, tokens/s, contribution).
* ``{run}_control``, ``{run}_bootstraps``, ``{run}_metrics``: the run's state, its live bootstraps, and
  what trainers and peers report to the bootstrap (read and written by ``dht.control``).
* ``{run}_bans``: signed ``BanReport``s of peers caught returning wrong results (``dht.bans``).
* ``{run}_data``: the ``DataRecord`` of the bootstrap that leases the run's data shards: where to ask
  for a lease, and how far the data is (epoch, shards done and in progress, tokens, the last evaluation).

Every record's model lives here, so the validators (``dht.validators``, ``dht.auth``) know them all
without importing the modules that read and write them.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from typing import Literal

from pydantic import Field, field_validator

from core.messages import PROTOCOL_VERSION, FrozenModel
from core.types import LayerRange, PeerId, StageIndex

__all__ = [
    "RECORD_TTL",
    "RECORD_REFRESH",
    "MAX_STAGES",
    "OptimizerSettings",
    "DatasetSpec",
    "Manifest",
    "PeerState",
    "HardwareSummary",
    "GpuStats",
    "PeerRecord",
    "TrainerRecord",
    "manifest_key",
    "stage_key",
    "trainers_key",
    "StoreRecord",
    "store_key",
    "MetricsRecord",
    "MetricsRole",
    "LOSS_TREND_LEN",
    "telemetry_key",
    "RunState",
    "RunControl",
    "MetricsReport",
    "BootstrapRecord",
    "control_key",
    "metrics_key",
    "bootstraps_key",
    "BanEvidence",
    "BanReport",
    "bans_key",
    "EvalPoint",
    "DataProgress",
    "DataRecord",
    "data_key",
]

RECORD_TTL = 60.0
RECORD_REFRESH = 20.0
MAX_STAGES = 1024


class OptimizerSettings(FrozenModel):
    """AdamW settings every stage (and the trainer) uses, so all parts of the model step alike."""

    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.01, ge=0)


class DatasetSpec(FrozenModel):
    """A text dataset, as ``datasets.load_dataset`` reads it, and how the run cuts it into shards.

    ``source`` is a hub id, a local directory or a file (jsonl, json, parquet, csv, txt); shard ``k``
    of ``num_shards`` holds the samples whose index in ``split`` is ``k`` modulo ``num_shards``, so
    the shards are known without reading the data. ``streaming`` None: hub datasets stream, local
    files are read into the HF cache. Trainers with the same spec share one set of leases
    (``dataset_id``)."""

    source: str = Field(min_length=1, max_length=500)
    split: str = Field("train", min_length=1, max_length=100)
    text_column: str = Field("text", min_length=1, max_length=100)
    config_name: str | None = Field(None, max_length=100)
    num_shards: int = Field(16, ge=1, le=65536)
    streaming: bool | None = None

    @property
    def dataset_id(self) -> str:
        """What leases are kept under: the data and its cut, not how it is read (``streaming``)."""
        key = [self.source, self.split, self.text_column, self.config_name, self.num_shards]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


class Manifest(FrozenModel):
    """The run: which model, how it is cut into stages, and how it is optimised.

    ``target_batch_size`` is the number of sequences whose gradients a stage accumulates before it
    steps its optimizer: a trainer whose batch has that many rows steps in lockstep with the stages.
    """

    version: int = PROTOCOL_VERSION
    run_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = Field(min_length=1)
    config_hash: str
    num_layers: int = Field(gt=0)
    stages: list[LayerRange] = Field(min_length=1, max_length=MAX_STAGES)
    target_batch_size: int = Field(8, gt=0)
    optimizer: OptimizerSettings = OptimizerSettings()
    dtype: str = "float32"
    wire: str = Field("float32", pattern="^(float32|float16|bfloat16|int8)$",
                      description="how activations and gradients travel between trainer and peers (net.wire)")
    dataset: DatasetSpec | None = Field(None, description="what trainers train on when they name no dataset "
                                        "(``swarm bootstrap --dataset``)")

    @field_validator("stages")
    @classmethod
    def _contiguous(cls, stages: list[LayerRange]) -> list[LayerRange]:
        for before, after in zip(stages, stages[1:]):
            if before.end != after.start:
                raise ValueError(f"stages must be contiguous: {before} is followed by {after}")
        if stages[0].start != 0:
            raise ValueError(f"the first stage must start at layer 0, not {stages[0].start}")
        return stages

    @property
    def num_stages(self) -> int:
        return len(self.stages)


class PeerState(str, Enum):
    LOADING = "loading"
    ONLINE = "online"
    DRAINING = "draining"
    OFFLINE = "offline"


class GpuStats(FrozenModel):
    """One GPU a peer computes on: NVML's index, its name, and means over the last minute (None:
    the board does not report that figure)."""

    index: int = Field(ge=0)
    name: str = Field("", max_length=128)
    util_percent: float | None = None
    memory_used_gib: float = 0.0
    memory_total_gib: float = 0.0
    temperature_c: float | None = None
    power_w: float | None = None


class HardwareSummary(FrozenModel):
    """What a peer runs on, for people reading `swarm status` (GPU fields empty on CPU machines)."""

    device: str = "cpu"
    cpu_count: int = 0
    ram_gib: float = 0.0
    gpu_name: str | None = None
    gpu_memory_gib: float | None = None
    torch_threads: int = 1
    # live figures from peers.telemetry.monitor (means over the last minute; GPU ones over all GPUs, None without)
    cpu_percent: float = 0.0
    ram_used_gib: float = 0.0
    gpu_count: int = 0
    gpu_util_percent: float | None = None
    gpu_memory_used_gib: float | None = None
    gpu_temperature_c: float | None = None
    gpu_power_w: float | None = None
    # the GPU(s) this peer computes on (``device`` names it, e.g. cuda:1), each on its own; empty on the CPU
    gpus: list[GpuStats] = Field(default_factory=list, max_length=16)


class PeerRecord(FrozenModel):
    """A peer's announcement for one stage: where to reach it and how fast it is."""

    version: int = PROTOCOL_VERSION
    peer_id: PeerId
    maddrs: list[str] = Field(default_factory=list, max_length=16)
    stage: StageIndex = Field(ge=0, lt=MAX_STAGES)
    layers: LayerRange
    state: PeerState = PeerState.LOADING
    throughput: float = Field(0.0, ge=0, description="tokens/s for forward+backward of this stage")
    hardware: HardwareSummary = HardwareSummary()
    step: int = Field(0, ge=0, description="optimizer steps the peer's stage has applied")
    # written by the peer itself (DHT time): readers call a record stale when this is old
    updated: float = 0.0
    load: float = Field(0.0, ge=0, description="requests in flight or queued when the record was written")
    delegate_of: PeerId | None = Field(None, description="peer id this peer computes for (delegation)")
    access_token: str | None = Field(None, max_length=4096, description="run key token (keyed runs only)")
    latency_ms: float | None = Field(None, ge=0, description="median round trip to a few peers")
    bandwidth_mbps: float | None = Field(None, ge=0, description="measured link speed, megabits/s")
    memory_gib: float | None = Field(None, ge=0, description="memory this peer can give to stages")
    compute: float | None = Field(None, ge=0, description="tokens/s of this peer for one stage (placement of "
                                  "peers joining together)")
    network: float | None = Field(None, ge=0, description="tokens/s this peer's link carries")
    claimed: float | None = Field(None, ge=0, description="DHT time a joining peer claimed this stage: peers "
                                  "joining together plan as a group; an older claim is settled")


class StoreRecord(FrozenModel):
    """A node that keeps the latest checkpoint of every stage (``swarm.checkpoint.*`` RPCs)."""

    version: int = PROTOCOL_VERSION
    peer_id: PeerId = Field(min_length=1, max_length=128)
    maddrs: list[str] = Field(default_factory=list, max_length=16)


LOSS_TREND_LEN = 16


class MetricsRole(str, Enum):
    TRAINER = "trainer"
    PEER = "peer"


class MetricsRecord(FrozenModel):
    """What one trainer or peer reports about its work, under ``{run}_telemetry`` (a few hundred bytes).

    A trainer fills ``step``, ``loss``, ``loss_trend`` (its last losses, oldest first) and
    ``tokens_per_s`` (tokens trained per second); a peer fills ``requests_per_s``, ``tokens_per_s``
    (tokens it processed per second), ``tokens``/``microbatches`` (totals since it started: its
    contribution) and ``ledger_entries`` (signed entries of its contribution ledger so far).
    """

    version: int = PROTOCOL_VERSION
    role: MetricsRole
    peer_id: PeerId = Field(min_length=1, max_length=128)
    updated: float = 0.0
    step: int = Field(0, ge=0)
    loss: float | None = None
    loss_trend: list[float] = Field(default_factory=list, max_length=LOSS_TREND_LEN)
    tokens_per_s: float = Field(0.0, ge=0)
    requests_per_s: float = Field(0.0, ge=0)
    tokens: int = Field(0, ge=0)
    microbatches: int = Field(0, ge=0)
    ledger_entries: int = Field(0, ge=0)
    stages: list[StageIndex] = Field(default_factory=list, max_length=MAX_STAGES)
    access_token: str | None = Field(None, max_length=4096, description="run key token (keyed runs only)")


class TrainerRecord(FrozenModel):
    """A trainer's progress: it contributes ``samples`` sequences to collaborative step ``step``.

    ``prev_step`` / ``prev_samples`` keep what it gave the step before, so a slower trainer that still
    waits on that step can count it after this one has moved on. ``online`` False: it has left.
    """

    version: int = PROTOCOL_VERSION
    trainer_id: str = Field(min_length=1, max_length=128)
    step: int = Field(0, ge=0)
    samples: int = Field(0, ge=0)
    prev_step: int = Field(-1, ge=-1)
    prev_samples: int = Field(0, ge=0)
    online: bool = True
    updated: float = 0.0
    access_token: str | None = Field(None, max_length=4096, description="run key token (keyed runs only)")

    def samples_in(self, step: int) -> int:
        if step == self.step:
            return self.samples
        return self.prev_samples if step == self.prev_step else 0


def manifest_key(run_id: str) -> str:
    return f"{run_id}_manifest"


def stage_key(run_id: str, stage: StageIndex) -> str:
    return f"{run_id}_stage_{stage}"


def trainers_key(run_id: str) -> str:
    return f"{run_id}_trainers"


def store_key(run_id: str) -> str:
    return f"{run_id}_checkpoint_stores"


def telemetry_key(run_id: str) -> str:
    return f"{run_id}_telemetry"


# -- run control, bootstraps and metrics (read and written by ``dht.control``) ---------------------

class RunState(str, Enum):
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class RunControl(FrozenModel):
    """What the run owner wants now. ``changed_at`` is when the owner last changed the run state or
    the keys (so bootstraps that have synced publish equal records): the newest record's state
    holds; revocations of every trusted record hold (see ``get_control``)."""

    version: int = PROTOCOL_VERSION
    state: RunState = RunState.RUNNING
    changed_at: float = 0.0
    reason: str = Field("", max_length=200)
    keys_required: bool = False
    revoked: list[str] = Field(default_factory=list, max_length=512)
    banned: list[str] = Field(default_factory=list, max_length=512,
                              description="peer ids the owner banned or kicked: left out of every view")


class MetricsReport(FrozenModel):
    """One trainer's or peer's latest figures. ``samples`` is a running total since it started."""

    version: int = PROTOCOL_VERSION
    peer_id: PeerId = Field(min_length=1, max_length=128)
    role: Literal["trainer", "peer"]
    step: int = Field(0, ge=0)
    loss: float | None = None
    tokens_per_second: float = Field(0.0, ge=0)
    samples: int = Field(0, ge=0)
    stage: StageIndex | None = Field(None, ge=0)
    access_token: str | None = Field(None, max_length=4096)


class BootstrapRecord(FrozenModel):
    """A live bootstrap (primary or ``--mirror``) of the run, where a key can be exchanged for a
    token. Signed by the run's authority (only a holder of that key can publish one)."""

    version: int = PROTOCOL_VERSION
    peer_id: PeerId = Field(min_length=1, max_length=128)
    maddrs: list[str] = Field(default_factory=list, max_length=8)
    role: Literal["primary", "mirror"] = "primary"
    dashboard: str | None = Field(None, max_length=200)
    updated: float = 0.0
    serving: bool = True


def bootstraps_key(run_id: str) -> str:
    return f"{run_id}_bootstraps"


def control_key(run_id: str) -> str:
    return f"{run_id}_control"


def metrics_key(run_id: str) -> str:
    return f"{run_id}_metrics"


# -- ban reports (read, written and judged by ``dht.bans``) ----------------------------------------

_SHA256 = r"^[0-9a-f]{64}$"


class BanEvidence(FrozenModel):
    """What a spot check saw (``trainer.spotcheck``): the same inputs and dropout seed sent to three
    replicas of ``stage`` (``layers``) at optimizer ``step``; the accused's output differed from the
    honest replica's by up to ``max_abs_diff``, and the third replica sided with the honest one (the
    same digest, or, on other hardware, closer to it: ``third_gap`` < ``max_abs_diff``). Digests are
    sha256 of each tensor's dtype, shape and bytes as received (``trainer.spotcheck.digest``).

    It travels inside the ``BanReport`` value, which ``report_ban`` stores under a subkey ending in the
    reporter's public key, so hivemind's ``RSASignatureValidator`` has it signed by the reporter's own
    DHT key and every node checks that signature: the reporter vouches for the evidence and cannot
    disown it, and nobody else can alter it. It proves consistency, not truth (see the module)."""

    stage: StageIndex = Field(ge=0)
    layers: LayerRange
    step: int = Field(ge=0)
    inputs: str = Field(pattern=_SHA256, description="sha256 of the stage inputs (hidden states, mask, positions)")
    accused_output: str = Field(pattern=_SHA256)
    honest_output: str = Field(pattern=_SHA256)
    third_output: str = Field(pattern=_SHA256)
    honest_peer: str = Field(min_length=1, max_length=128)
    third_peer: str = Field(min_length=1, max_length=128)
    max_abs_diff: float = Field(ge=0, description="max |accused - honest|")
    third_gap: float = Field(0.0, ge=0, description="max |third - honest|")


class BanReport(FrozenModel):
    """``peer_id`` returned outputs of ``stage`` that other replicas contradict (``reason`` says how
    much, ``evidence`` what the spot check saw; a report without evidence is refused by ``judge``).
    ``reporter`` must be the signer (the validator, ``dht.auth``)."""

    version: int = PROTOCOL_VERSION
    peer_id: PeerId = Field(min_length=1, max_length=128)
    stage: StageIndex = Field(ge=0)
    reason: str = Field(max_length=300)
    reporter: PeerId = Field(min_length=1, max_length=128)
    evidence: BanEvidence | None = None
    at: float = 0.0
    access_token: str | None = Field(None, max_length=4096, description="run key token (keyed runs only)")


def bans_key(run_id: str) -> str:
    return f"{run_id}_bans"


# -- data shards and evaluation (written by ``bootstrap.data``) ------------------------------------

class EvalPoint(FrozenModel):
    """A held-out evaluation of the run's weights at ``step``: mean token loss over ``tokens`` tokens."""

    step: int = Field(ge=0)
    loss: float
    perplexity: float
    tokens: int = Field(ge=0)
    at: float = 0.0


class DataProgress(FrozenModel):
    """How far the run is through one dataset: the oldest ``epoch`` not finished, and in it the shards
    done and those leased now; ``tokens`` trained on it over all epochs."""

    dataset_id: str = Field(max_length=32)
    source: str = Field(max_length=500)
    num_shards: int = Field(ge=1)
    epoch: int = Field(ge=0)
    shards_done: int = Field(ge=0)
    shards_in_progress: int = Field(ge=0)
    tokens: int = Field(ge=0)


class DataRecord(FrozenModel):
    """Published by the bootstrap that leases data shards (``swarm.data.*`` RPCs at ``peer_id``)."""

    version: int = PROTOCOL_VERSION
    peer_id: PeerId = Field(min_length=1, max_length=128)
    updated: float = 0.0
    progress: DataProgress | None = None
    eval: EvalPoint | None = None


def data_key(run_id: str) -> str:
    return f"{run_id}_data"
