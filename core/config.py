"""One config tree for every command: defaults < ``swarm.toml`` < ``SWARM_*`` env vars < CLI flags.

Env vars name nested fields with ``__``: ``SWARM_NETWORK__PORT=31337``, ``SWARM_PEER__THREADS=2``.
The TOML file is ``--config PATH``, else ``$SWARM_CONFIG``, else ``./swarm.toml`` when it exists::

    run_id = "my-run"
    [network]
    host = "0.0.0.0"
    port = 31337
    [bootstrap]
    model = "Qwen/Qwen2-0.5B"
    num_stages = 4
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from core.errors import ConfigError
from core.types import PeerId, StageIndex

__all__ = [
    "MIN_RELAY_BYTES",
    "offers_relay",
    "relay_limits",
    "NetworkSettings",
    "BootstrapSettings",
    "PeerSettings",
    "TrainerSettings",
    "MonitorSettings",
    "LogSettings",
    "ApiSettings",
    "DelegationSettings",
    "DataSettings",
    "SwarmSettings",
    "load_settings",
    "trainer_settings",
    "check_multiaddr",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


MIN_RELAY_BYTES = 64 << 20
"""The least a relay must carry per relayed connection (each way) for a peer behind NAT to take its
slot: libp2p's default of 128 KiB cuts a single stage's activations or weights."""


class NetworkSettings(_Section):
    host: str = Field("0.0.0.0", description="address to listen on (127.0.0.1 for a local swarm)")
    port: int = Field(0, ge=0, le=65535, description="TCP port; 0 picks a free one")
    announce_host: str | None = Field(None, description="public address to announce, if not the listen one")
    initial_peers: list[str] = Field(default_factory=list, description="multiaddrs to join through")
    channel: bool = Field(True, description="serve stage and inference calls on a direct TCP data channel beside "
                          "libp2p (callers that cannot dial it use libp2p)")
    channel_host: str | None = Field(None, description="where the data channel listens (default: host)")
    channel_port: int = Field(0, ge=0, le=65535, description="the data channel's TCP port; 0 picks a free one")
    channel_tls: bool = Field(True, description="encrypt the data channel (TLS 1.3, certificates pinned through "
                              "libp2p); false only on a network you trust: calls then travel in clear")
    relay: bool = Field(True, description="offer a relay slot to peers behind NAT when this node is reachable "
                        "(a circuit relay: their callers reach them through it)")
    relay_slots: int = Field(128, ge=1, description="relay slots this node gives peers behind NAT, at most")
    relay_circuits: int = Field(16, ge=1, description="relayed connections open at once per peer behind NAT")
    relay_bytes: ByteSize = Field(ByteSize(4 << 30), ge=MIN_RELAY_BYTES, description="bytes one relayed connection may "
                                  "carry each way before the relay resets it (the caller then dials again), e.g. "
                                  "4GiB; at least 64MiB, the least peers behind NAT accept")
    dht_process: bool = Field(False, description="serve the DHT node in a child process of its own (hivemind's "
                              "way: ~180 MiB PSS more for a peer) instead of on a thread of this process")
    reachability: str = Field("auto", pattern="^(auto|public|private)$", description="whether others can dial this "
                              "node: auto (private if its address is private and the bootstrap's is outside its "
                              "network), public (no relay slot) or private (serve through a relay)")

    @field_validator("initial_peers")
    @classmethod
    def _multiaddrs(cls, peers: list[PeerId]) -> list[str]:
        for address in peers:
            try:
                check_multiaddr(address)
            except ConfigError as e:  # pydantic reports ValueErrors with the field's name
                raise ValueError(str(e)) from None
        return peers


def offers_relay(network: NetworkSettings) -> bool:
    """Whether a node relays for peers behind NAT: asked to, not told it is private itself, and
    listening beyond loopback (nobody outside this machine could reach a relay on 127.x)."""
    return network.relay and network.reachability != "private" and not network.host.startswith("127.")


def relay_limits(network: NetworkSettings) -> tuple[int, int, int]:
    """(slots, relayed connections per peer, bytes per relayed connection) of a node's relay service."""
    return network.relay_slots, network.relay_circuits, int(network.relay_bytes)


class _TlsSection(_Section):
    """An HTTP server that may face the internet itself (the dashboard, serve-api): https when both
    files are given (uvicorn's ``ssl_certfile``/``ssl_keyfile``); or plain http behind a reverse proxy
    (see the README)."""

    ssl_certfile: Path | None = Field(None, description="serve over https with this certificate (PEM)")
    ssl_keyfile: Path | None = Field(None, description="the private key of ssl_certfile (PEM)")

    @model_validator(mode="after")
    def _both_tls_files(self) -> "_TlsSection":
        given = [f for f in (self.ssl_certfile, self.ssl_keyfile) if f is not None]
        if len(given) == 1:
            raise ValueError("ssl_certfile and ssl_keyfile go together: give both for https, or neither")
        for path in given:
            if not path.expanduser().is_file():
                raise ValueError(f"TLS file {path} does not exist (or is not a file)")
        return self

    def tls(self) -> dict[str, str]:
        """uvicorn.Config's keyword arguments for https, empty for http."""
        if self.ssl_certfile is None or self.ssl_keyfile is None:
            return {}
        return {"ssl_certfile": str(self.ssl_certfile.expanduser()), "ssl_keyfile": str(self.ssl_keyfile.expanduser())}


class BootstrapSettings(_TlsSection):
    model: str | None = Field(None, description="HF hub id or local directory of the model to train")
    num_stages: int = Field(2, ge=1)
    target_batch_size: int = Field(8, ge=1, description="sequences per optimizer step")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    dtype: str = Field("float32", pattern="^(float32|float16|bfloat16)$", description="precision of the compute: "
                       "float32, or bfloat16 / float16 under autocast (weights and AdamW state stay float32; "
                       "float16 scales gradients); the wire format is the separate --wire")
    wire: str = Field("float32", pattern="^(float32|float16|bfloat16|int8)$",
                      description="how activations and gradients travel: float32 (exact), float16, bfloat16 or "
                      "int8 (blockwise, 3.8x smaller)")
    metrics_interval: float = Field(5.0, gt=0, description="seconds between metrics collection rounds")
    open: bool = Field(False, description="a public run: no API key needed to join (keys are required by default)")
    token_ttl: float = Field(1800.0, ge=30, description="seconds an access token lives (renewed at half-life)")
    dashboard_port: int = Field(8002, ge=0, le=65535, description="admin dashboard port (0: a free one)")
    dashboard_host: str | None = Field(None, description="dashboard listen address (default: network.host)")
    dashboard: bool = Field(True, description="serve the admin dashboard and HTTP API")
    mirror: str | None = Field(None, description="multiaddr of a running bootstrap of this run: start as its mirror")
    authority_key: Path | None = Field(None, description="the run's authority key (authority.key of the first "
                                       "bootstrap's state dir); a mirror needs it to issue tokens")
    sync_interval: float = Field(5.0, gt=0, description="seconds between state syncs with the run's other bootstraps")
    metrics_retention: float = Field(7 * 86400.0, gt=0, description="seconds of per-peer history kept in state.db")
    alert_webhook: str | None = Field(None, pattern=r"^https?://", description="POST alerts (JSON with a 'text' "
                                      "field, as Slack and most chat hooks take) to this URL")
    alert_stall: float = Field(600.0, gt=0, description="alert when the training step has not moved for this many "
                               "seconds while the run is running and trainers report")


_DEVICE = r"^(auto|cpu|cuda(:\d+)?)$"


class PeerSettings(_Section):
    device: str = Field("auto", pattern=_DEVICE, description="where this peer computes: auto (its GPU when CUDA is "
                        "present, else the CPU), cpu, cuda or cuda:N")
    devices: str | None = Field(None, pattern=r"^\s*(cpu|cuda(:\d+)?|\d+)(\s*,\s*(cpu|cuda(:\d+)?|\d+))*\s*$",
                                description="swarm join serves one peer per device listed, e.g. 0,1,2,3 "
                                "(default: every visible GPU, else the one --device)")
    offload_optimizer: bool | Literal["auto"] = Field(
        "auto", description="keep AdamW's state in host memory instead of the GPU: true, false, or auto (only "
        "when the GPU's free memory holds the stage but not its AdamW state as well)")
    threads: int | None = Field(None, ge=1, description="torch threads for compute (default: all cores)")
    stage: str | None = Field(None, description="serve this stage, or range of stages like 2-3, instead of what "
                              "placement picks")
    max_stages: int | None = Field(None, ge=1, description="serve at most this many consecutive stages (default: "
                                   "as many as memory holds and raise the bottleneck)")
    throughput: float | None = Field(None, gt=0, description="tokens/s for one stage to announce instead of "
                                     "measuring it (a known machine; tests that need equal peers)")
    cache_size: int = Field(64, ge=1, description="forward graphs kept for backward")
    queue_size: int = Field(64, ge=1, description="forwards and backwards that may wait for a stage's compute "
                            "thread; more are refused (CapacityExceeded) and the trainer goes elsewhere")
    memory: ByteSize | None = Field(None, description="memory to give to stages, e.g. 24GiB (default: what is free)")
    rebalance: bool | None = Field(None, description="move to another stage when that raises the bottleneck "
                                   "(default: yes, unless --stage pins this peer)")
    rebalance_period: float = Field(60.0, gt=0, description="seconds between re-evaluations (randomised +-50%)")
    rebalance_margin: float = Field(0.15, ge=0, description="move only when the swarm is this much out of balance")
    watch_period: float = Field(3.0, gt=0, description="seconds between quick looks for an empty stage to fill "
                                "or a stage of this peer's own span to drop (nothing to load: done at once)")
    claim_settle: float = Field(2.0, ge=0, description="seconds a joining peer waits after its claim to see the "
                                "claims of peers joining with it, before they split the stages between them")
    averaging_cost: float = Field(0.5, ge=0, description="seconds placement counts for one averaging round of "
                                  "a stage with several replicas, beyond its traffic (measured on loopback: "
                                  "benchmarks/recovery.py)")
    step_tokens: int | None = Field(None, gt=0, description="tokens a training step holds, for placement's "
                                    "averaging cost (default: the run's target batch size x 128)")
    drain_seconds: float = Field(12.0, ge=0, description="a moving peer keeps serving its old stage this long "
                                 "(trainers refresh routes every 10 s), then until idle")
    slowdown: float = Field(0.0, ge=0, description="artificial seconds added to every forward and backward "
                            "(tests and demos of a slow peer)")
    corrupt: float = Field(0.0, ge=0, description="TESTS ONLY: add noise of this scale to every output and input "
                           "gradient this peer returns (a peer returning wrong results, for spot checks)")
    averaging_timeout: float = Field(15.0, gt=0, description="seconds an averaging round of a step may take "
                                     "(finding the other replicas, then the all-reduce)")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between checkpoints of the stage")
    checkpoint_keep: int = Field(2, ge=1, description="checkpoints of a stage kept in the state dir")
    inference_memory: ByteSize = Field(ByteSize(1 << 30), description="attention cache for inference sessions "
                                       "(e.g. 512MiB); a full peer refuses new sessions")
    session_timeout: float = Field(300.0, gt=0, description="seconds an idle inference session is kept")
    max_abs_value: float = Field(1e6, gt=0, description="inputs and gradients with a larger value (or NaN/inf) "
                                 "are refused as corrupt")
    averaging_clip: float = Field(8.0, gt=1, description="a replica's gradient counts at most this many times the "
                                  "median replica's norm when replicas average (a poisoning replica is clipped)")
    averager_process: bool = Field(False, description="run each stage's averager in a child process of its own "
                                   "(hivemind's way: ~100 MiB PSS more for a peer of one stage) instead of on a "
                                   "thread of the peer; needs network.dht_process")

    @field_validator("stage", mode="before")
    @classmethod
    def _stage_or_range(cls, value: object) -> object:
        """``2`` or ``"2"`` (one stage) or ``"2-3"`` (consecutive stages), kept as text."""
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"expected a stage or a range like 2-3, got {value!r}")
        text = str(value).replace(" ", "")
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
        if match is None:
            raise ValueError(f"{value!r} is not a stage or a range of stages like 2 or 2-3")
        if match.group(2) is not None and int(match.group(2)) < int(match.group(1)):
            raise ValueError(f"{value!r}: the range ends before it starts")
        return text


class ApiSettings(_TlsSection):
    """``swarm serve-api``: where the OpenAI-compatible server listens and who may call it."""

    host: str = Field("127.0.0.1", description="address the HTTP server listens on (0.0.0.0 for everyone)")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port; 0 picks a free one")
    api_keys: list[str] = Field(default_factory=list, description="accepted 'Authorization: Bearer' keys; "
                                "empty: no key needed")
    model_name: str | None = Field(None, description="the model id clients send (default: the model's name)")
    requests_per_minute: int | None = Field(None, ge=1, description="per key (or per server when open): more "
                                            "requests in a minute get 429 with Retry-After; none: no limit")
    tokens_per_minute: int | None = Field(None, ge=1, description="per key: prompt and completion tokens in a "
                                          "minute past which requests get 429; none: no limit")
    max_concurrent: int | None = Field(32, ge=1, description="requests in flight on this server past which "
                                       "requests get 429; none: no limit")


class TrainerSettings(_Section):
    """How a trainer calls the stages and how long it waits when they fail.

    The wait budget must outlast the swarm's repair of an empty stage: when a stage's last replica
    dies, a peer notices the hole (placement checks every few seconds), claims it (up to 2 s), drains
    the stage it leaves (``peer.drain_seconds``, 12 s, and up to 30 s more while requests are in
    flight) and loads the stage's state: tens of seconds. ``route_wait`` (120 s) bounds the trainer's
    wait for that, re-reading the DHT every 2 s at most; training fails (``NoRoute``) only past it.
    ``ban_time`` (60 s) is how long a failed peer is left out before it is probed; it comes back only
    if it answers, so a dead peer whose record lingers in the DHT (up to 60 s after its last refresh)
    is never dialed for work again, whatever ``ban_time`` is."""

    device: str = Field("cpu", pattern=_DEVICE, description="where the local parts (embeddings, final norm, "
                        "head) compute: cpu, cuda, cuda:N or auto (as nn.Module: cpu unless asked)")
    microbatch_size: int | None = Field(None, ge=1)
    push: bool = Field(True, description="training activations go peer to peer along the route (false: the "
                       "trainer relays every hop)")
    channel: bool = Field(True, description="call peers over their direct data channels where they offer one "
                          "(false: libp2p streams only)")
    timeout: float = Field(120.0, gt=0, description="seconds to wait for one stage call")
    ban_time: float = Field(60.0, gt=0, description="seconds a failed peer is left out of routes (then it must "
                            "answer a probe to come back)")
    route_wait: float = Field(120.0, gt=0, description="seconds to wait for a peer to take over a stage nobody "
                              "serves before training fails; more than the swarm takes to refill a stage")
    averaging_window: float = Field(0.5, gt=0, description="seconds from a step's request to the replicas' averaging")
    step_wait: float = Field(60.0, ge=0, description="seconds to wait for other trainers to finish a step")
    checkpoint_every: int = Field(50, ge=1, description="steps between uploads of the local parts' weights")
    max_abs_value: float = Field(1e6, gt=0, description="a stage output or gradient with a larger value (or "
                                 "NaN/inf) is invalid: that peer is banned and the work replayed elsewhere")
    spot_check_rate: float = Field(0.02, ge=0, le=1, description="fraction of training forwards recomputed on "
                                   "another replica of the stage to catch peers that return wrong outputs")
    spot_check_tolerance: float | None = Field(None, gt=0, description="relative and absolute tolerance of a spot "
                                               "check (default: 1e-3 for float32, 1e-2 float16, 5e-2 bfloat16)")


class MonitorSettings(_Section):
    """Hardware sampling, the Prometheus endpoint and the contribution ledger (peers, trainers, bootstrap)."""

    interval: float = Field(5.0, gt=0, description="seconds between hardware samples and live-line updates")
    history: int = Field(720, ge=1, description="hardware samples kept (720 x 5 s = one hour)")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="serve Prometheus /metrics here (0: any free port)")
    metrics_host: str = Field("127.0.0.1", description="address of the /metrics endpoint (0.0.0.0 for a remote scraper)")
    ledger_window: float = Field(30.0, gt=0, description="seconds of work summed into one signed ledger entry")


class LogSettings(_Section):
    """Where logs go besides the terminal: a rotating file under ``state_dir/<run>/logs``."""

    file: bool = Field(True, description="also write JSON-lines logs to a rotating file in the state dir")
    max_bytes: int = Field(10 << 20, ge=1024, description="rotate the log file at this size")
    backups: int = Field(3, ge=0, description="rotated log files kept")


class DelegationSettings(_Section):
    """Both sides of delegation (``delegation/``): a strong peer that accepts sessions, and a weak
    machine that hands its stage to one (env: ``SWARM_DELEGATION__MAX_SESSIONS`` and so on)."""

    accept: bool = Field(False, description="serve other machines' stages on their behalf (--accept-delegations)")
    tokens: list[str] = Field(default_factory=list, description="delegation tokens this delegate accepts "
                              "(compared in constant time); empty with accept: no session can start")
    tokens_file: Path | None = Field(None, description="more accepted tokens, one a line; re-read every few "
                                     "seconds, so removing a line revokes that token and ends its sessions")
    max_sessions: int = Field(10, ge=1, description="sessions this delegate holds at once")
    session_ttl: float = Field(330.0, gt=0, description="seconds a session lives without being polled")
    delegate_to: list[str] = Field(default_factory=list, description="multiaddrs of delegates to hand this "
                                   "machine's stage to, tried in order (--delegate-to)")
    token: str | None = Field(None, description="delegation token to present to the delegate (--delegation-token)")
    stage: StageIndex | None = Field(None, ge=0, description="stage to have served (default: the delegate picks)")
    poll_interval: float = Field(5.0, gt=0, description="seconds between the delegator's polls for receipts")

    @field_validator("delegate_to")
    @classmethod
    def _multiaddrs(cls, delegates: list[str]) -> list[str]:
        return NetworkSettings._multiaddrs(delegates)


class DataSettings(_Section):
    """What ``swarm train`` trains and evaluates on (``swarm bootstrap``: the run's dataset, put in the
    manifest so trainers need only ``--bootstrap``). ``source`` None: the run's dataset, else the
    Python stdlib's source as bytes (the demo's corpus)."""

    source: str | None = Field(None, description="hub id, local directory or file (jsonl, json, parquet, csv, "
                               "txt) of the dataset (--dataset)")
    split: str = Field("train", min_length=1, description="split to train on (--split)")
    text_column: str = Field("text", min_length=1, description="the column holding the text (--text-column)")
    config_name: str | None = Field(None, description="the dataset's configuration, if it has several (--config-name)")
    num_shards: int = Field(16, ge=1, le=65536, description="shards the data is cut into and leased to trainers "
                            "(each reads its own; more shards than trainers)")
    streaming: bool | None = Field(None, description="read the data as a stream (default: hub datasets stream, "
                                   "local files are read into the HF cache)")
    lease_ttl: float = Field(60.0, ge=5, description="seconds a shard's lease lasts unrenewed (the bootstrap); a "
                             "dead trainer's shard goes to another after this")
    eval_split: str | None = Field(None, description="held-out split to evaluate on (--eval-split)")
    eval_every: int = Field(0, ge=0, description="evaluate every this many steps (0: never; --eval-every)")
    eval_batches: int = Field(4, ge=1, description="batches of the eval split one evaluation reads (the same each "
                              "time)")


class SwarmSettings(BaseSettings):
    """Every setting of swarm; each field is settable from TOML, env or the CLI."""

    model_config = SettingsConfigDict(env_prefix="SWARM_", env_nested_delimiter="__", extra="forbid")

    run_id: str = Field("swarm", pattern=r"^[A-Za-z0-9_.-]+$")
    state_dir: Path = Field(Path("~/.swarm"), description="identity keys, manifest, logs")
    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    key: str | None = Field(None, description="API key to join a keyed run (SWARM_KEY)")
    network: NetworkSettings = NetworkSettings()
    bootstrap: BootstrapSettings = BootstrapSettings()
    peer: PeerSettings = PeerSettings()
    trainer: TrainerSettings = TrainerSettings()
    monitor: MonitorSettings = MonitorSettings()
    logs: LogSettings = LogSettings()
    api: ApiSettings = ApiSettings()
    delegation: DelegationSettings = DelegationSettings()
    data: DataSettings = DataSettings()

    toml_file: ClassVar[Path | None] = None

    @model_validator(mode="after")
    def _averager_process_needs_dht_process(self) -> "SwarmSettings":
        """A forked averager reaches the DHT over hivemind's pipe to the DHT's own process; a DHT on a
        thread of the peer has none (``dht.calls``)."""
        if self.peer.averager_process and not self.network.dht_process:
            raise ValueError("peer.averager_process needs network.dht_process = true: an averager in a child "
                             "process reaches the DHT only when the DHT runs in a process of its own too")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_file))
        return tuple(sources)


def check_multiaddr(address: str) -> None:
    """A peer's address must be a full multiaddr with its peer id (what ``swarm bootstrap`` prints):
    without the id, hivemind cannot tell whom it reached."""
    from multiaddr import Multiaddr  # 12 ms; only where addresses are given

    try:
        parsed = Multiaddr(address)
    except Exception as e:  # multiaddr raises several types for several kinds of garbage
        raise ConfigError(f"{address!r} is not a multiaddr ({e}); expected /ip4/HOST/tcp/PORT/p2p/PEER_ID") from None
    if "/p2p/" not in str(parsed):
        raise ConfigError(f"{address!r} lacks the peer id: expected /ip4/HOST/tcp/PORT/p2p/PEER_ID")


def load_settings(config_file: Path | None = None, **overrides: Any) -> SwarmSettings:
    """Build the settings; a broken file or value raises ``ConfigError`` naming the field."""
    path = config_file or (Path(os.environ["SWARM_CONFIG"]) if os.environ.get("SWARM_CONFIG") else None)
    if path is None and Path("swarm.toml").is_file():
        path = Path("swarm.toml")
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")

    class _Settings(SwarmSettings):
        toml_file = path

    try:
        settings = _Settings(**_drop_none(overrides))
    except ValidationError as e:
        raise ConfigError(_first_problem(e)) from None
    except Exception as e:  # tomllib.TOMLDecodeError and friends: the file itself is broken
        raise ConfigError(f"cannot read config {path}: {e}") from None
    return SwarmSettings.model_validate(settings.model_dump())


def trainer_settings(**overrides: Any) -> TrainerSettings:
    """The ``[trainer]`` settings with keyword ``overrides`` from Python code (``from_pretrained``):
    the same fields, bounds and defaults as ``swarm.toml``; a bad or unknown key raises
    ``ConfigError`` naming it."""
    try:
        return TrainerSettings(**overrides)
    except ValidationError as e:
        raise ConfigError(_first_problem(e, within="trainer")) from None


def _first_problem(error: ValidationError, within: str | None = None) -> str:
    """The first thing pydantic found wrong, for a person: the setting's dotted name, why, and the value."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in ((within,) if within else ()) + tuple(first["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    return f"setting {where}: {message} (got {first.get('input')!r})"


def _drop_none(overrides: dict[str, Any]) -> dict[str, Any]:
    """CLI flags that were not given arrive as None and must not hide TOML/env values."""
    cleaned: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if not value:
                continue
        if value is not None:
            cleaned[key] = value
    return cleaned
