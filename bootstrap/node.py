"""``BootstrapNode``: the run's first contact. Publishes the manifest and keeps a stable address.

Its libp2p identity and its port are kept in the state dir, so after a restart it has the same
multiaddr and the peers' ``--bootstrap`` lines stay valid; the manifest is kept there too, so a
restarted bootstrap republishes the same run rather than starting a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from bootstrap.checkpoints import CheckpointStore
from bootstrap.telemetry import BootstrapTelemetry
from dht.records import MANIFEST_TTL, SwarmDHT
from dht.schemas import Manifest, OptimizerSettings
from shards.assignment import stage_boundaries
from shards.families import family_of, num_layers
from shards.source import resolve_model
from swarm.config import SwarmSettings
from swarm.errors import ConfigError

__all__ = ["BootstrapNode", "build_manifest"]

logger = logging.getLogger(__name__)


def build_manifest(settings: SwarmSettings) -> Manifest:
    """Read the model's config (only config.json) and cut its layers into the requested stages."""
    boot = settings.bootstrap
    if not boot.model:
        raise ConfigError("the bootstrap needs --model (a hub id or a directory with config.json)")
    source = resolve_model(boot.model)
    family_of(source.config)  # refuse an unsupported architecture before anyone joins
    layers = num_layers(source.config)
    if boot.num_stages > layers:
        raise ConfigError(f"--num-stages {boot.num_stages} is more than the model's {layers} layers")
    model = str(Path(boot.model).resolve()) if Path(boot.model).is_dir() else boot.model
    return Manifest(
        run_id=settings.run_id,
        model=model,
        config_hash=source.config_hash,
        num_layers=layers,
        stages=stage_boundaries(layers, boot.num_stages),
        target_batch_size=boot.target_batch_size,
        optimizer=OptimizerSettings(lr=boot.lr, weight_decay=boot.weight_decay),
        dtype=boot.dtype,
    )


class BootstrapNode:
    """A DHT peer with a persistent identity that keeps the run's manifest published."""

    def __init__(self, settings: SwarmSettings):
        self.settings = settings
        self.state_dir = settings.state_dir.expanduser() / settings.run_id
        self.dht: SwarmDHT | None = None
        self.manifest: Manifest | None = None
        self._task: asyncio.Task | None = None
        self._stopped = False
        self.checkpoints: CheckpointStore | None = None
        self.telemetry: BootstrapTelemetry | None = None

    async def start(self) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create state dir {self.state_dir}: {e.strerror}") from None
        self.manifest = self._load_or_build_manifest()
        net = self.settings.network
        port = net.port or self._saved_port()
        self.dht = await asyncio.to_thread(
            SwarmDHT.create, self.settings.run_id, initial_peers=net.initial_peers, host=net.host,
            port=port, announce_host=net.announce_host, identity_path=self.state_dir / "identity.key",
        )
        self._save_port()
        if not await self.dht.publish_manifest(self.manifest):
            logger.warning("the manifest was not stored in the DHT; retrying in the background")
        self._task = asyncio.create_task(self._republish_forever(), name="manifest-republish")
        self.checkpoints = CheckpointStore(self.state_dir / "checkpoint-store", self.manifest)
        await self.checkpoints.start(self.dht)
        self.telemetry = BootstrapTelemetry(self.settings, self.dht, self.state_dir)
        await self.telemetry.start()

    def _load_or_build_manifest(self) -> Manifest:
        path = self.state_dir / "manifest.json"
        if path.is_file():
            saved = Manifest.model_validate_json(path.read_text())
            wanted = self.settings.bootstrap.model
            if wanted and build_manifest(self.settings).config_hash != saved.config_hash:
                raise ConfigError(
                    f"{self.state_dir} holds run {saved.run_id!r} of {saved.model}; use another "
                    "--state-dir or --run to start a run of a different model"
                )
            logger.info("resuming run %r from %s", saved.run_id, path)
            return saved
        manifest = build_manifest(self.settings)
        path.write_text(manifest.model_dump_json(indent=2))
        return manifest

    def _saved_port(self) -> int:
        path = self.state_dir / "port"
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text())
        return 0

    def _save_port(self) -> None:
        for addr in self.dht.visible_maddrs():
            parts = addr.split("/")
            if "tcp" in parts:
                (self.state_dir / "port").write_text(parts[parts.index("tcp") + 1])
                return

    async def _republish_forever(self) -> None:
        while True:
            await asyncio.sleep(MANIFEST_TTL / 4)
            try:
                await self.dht.publish_manifest(self.manifest)
            except Exception as e:  # the DHT may be briefly unreachable; the next round retries
                logger.warning("republishing the manifest failed: %s", e)

    @property
    def maddrs(self) -> list[str]:
        return self.dht.visible_maddrs() if self.dht else []

    def join_command(self) -> str:
        run = "" if self.settings.run_id == "swarm" else f" --run {self.settings.run_id}"
        return f"swarm join --bootstrap {self.maddrs[0]}{run}"

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.checkpoints is not None:
            await self.checkpoints.stop()
        if self.telemetry is not None:
            await self.telemetry.stop()
        if self.dht is not None:
            await asyncio.to_thread(self.dht.shutdown)

    async def __aenter__(self) -> "BootstrapNode":
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
