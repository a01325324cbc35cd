"""``swarm export``: the swarm's current model as a standard Hugging Face checkpoint.

Every stage's weights come from one online replica (``swarm.stage.state`` without the optimizer
state); a stage with no replica falls back to the newest checkpoint in the run's checkpoint store,
and the export says so. The trainer's local parts (embeddings, final norm, head) live only in
trainers, which upload them to the store every ``trainer.checkpoint_every`` steps; with no upload
the model files' own local parts are used, again with a warning. ``shards.export`` then writes
``config.json`` + ``model.safetensors`` under the architecture's own tensor names.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dht.records import SwarmDHT
from dht.schemas import Manifest, PeerRecord, PeerState
from net.auth import ClientCalls
from peers.training.client import StageClient
from peers.state.snapshot import LOCAL_PART, StateMeta, part_name
from peers.state.store_client import StoreClient
from net.transport import Transport
from shards.export import local_checkpoint_names, save_hf_checkpoint, stage_checkpoint_names
from shards.families import family_of
from shards.local import load_local_parts
from shards.source import ModelSource, resolve_model
from core.loop import LoopThread
from core.errors import CheckpointMissing, ConfigError, NoRoute, StateMismatch, SwarmError
from core.types import PeerId, StageIndex

__all__ = ["ExportReport", "export_swarm", "gather_stage", "write_checkpoint", "weights_of"]

logger = logging.getLogger(__name__)

RETRY_PAUSE = 1.0
"""Seconds between two tries at a replica: time for a relay that reset a connection to be dialed again."""


@dataclass
class ExportReport:
    """Where the export went and where each part's weights came from (``stage-<i>`` / ``local``)."""

    out: Path
    sources: dict[str, str] = field(default_factory=dict)


def weights_of(meta: StateMeta, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters of a state, without its optimizer state: ``{parameter name: tensor}``."""
    return {name.removeprefix("param/"): t for name, t in tensors.items() if name.startswith("param/")}


async def gather_stage(
    manifest: Manifest, stage: StageIndex, records: Sequence[PeerRecord], client: StageClient, store: StoreClient,
    *, attempts: int = 3,
) -> tuple[dict[str, torch.Tensor], str]:
    """A stage's current weights: from an online replica (the next one on failure, and round again
    when all failed, ``attempts`` tries in all: a sole replica behind NAT is asked again over a fresh
    relayed connection when the last one broke), else from the newest stored checkpoint;
    ``(weights, where they came from)``."""
    layers = manifest.stages[stage]
    online = [r.peer_id for r in records if r.state == PeerState.ONLINE and r.stage == stage and r.layers == layers]
    steps = await _replica_steps(client, random.sample(online, len(online)), stage, attempts=attempts)
    newest = max(steps.values(), default=0)
    current = [p for p in steps if steps[p] == newest]  # never a replica behind the others
    for attempt, peer_id in enumerate((current * attempts)[:attempts]):
        try:
            meta, tensors = await client.fetch_state(peer_id, stage, layers, with_optimizer=False)
        except SwarmError as e:
            logger.warning("stage %d: replica %s did not send its weights (try %d of %d): %s", stage,
                           peer_id[-8:], attempt + 1, attempts, e)
            await asyncio.sleep(RETRY_PAUSE)
            continue
        _check_part(meta, manifest, stage)
        if meta.step < newest:
            logger.warning("stage %d: replica %s sent step %d, behind step %d; asking another", stage,
                           peer_id[-8:], meta.step, newest)
            continue
        return weights_of(meta, tensors), f"replica {peer_id[-8:]} (step {meta.step})"
    if steps:
        raise NoRoute(f"stage {stage}: no replica at its newest step {newest} handed its weights over; "
                      "export again in a moment")
    try:
        meta, tensors = await store.get(part_name(stage))
    except CheckpointMissing:
        raise NoRoute(f"stage {stage} has no online replica and no stored checkpoint: nothing to export") from None
    _check_part(meta, manifest, stage)
    logger.warning("stage %d has no online replica: exporting its checkpoint of step %d", stage, meta.step)
    return weights_of(meta, tensors), f"checkpoint (step {meta.step}), no replica online"


async def _replica_steps(client: StageClient, peers: Sequence[PeerId], stage: StageIndex,
                         *, attempts: int) -> dict[str, int]:
    """The optimizer step each of ``peers`` reports for ``stage`` now (a replica that does not answer
    within ``attempts`` tries is left out): export reads only replicas at the newest step, never one
    that fell behind."""
    steps = {}
    for peer_id in peers:
        for attempt in range(attempts):
            try:
                steps[peer_id] = (await client.info(peer_id, stage)).optimizer_step
                break
            except SwarmError as e:
                logger.warning("stage %d: replica %s did not answer (try %d of %d): %s", stage, peer_id[-8:],
                               attempt + 1, attempts, e)
                await asyncio.sleep(RETRY_PAUSE)
    return steps


def _check_part(meta: StateMeta, manifest: Manifest, stage: StageIndex | None) -> None:
    layers = None if stage is None else manifest.stages[stage]
    if (meta.run_id, meta.config_hash, meta.stage, meta.layers) != (manifest.run_id, manifest.config_hash, stage,
                                                                      layers):
        raise StateMismatch(f"got weights of {meta.part} of run {meta.run_id!r}, wanted {part_name(stage)} of "
                            f"run {manifest.run_id!r}")


def write_checkpoint(manifest: Manifest, source: ModelSource, stages: Sequence[Mapping[str, torch.Tensor]],
                     local: Mapping[str, torch.Tensor], out: Path) -> Path:
    """Rename every part's weights to the architecture's names and save the HF checkpoint, in float32:
    the master weights every precision of the run trains (its ``dtype`` is only that of the compute)."""
    family = family_of(source.config)
    tensors: dict[str, torch.Tensor] = {}
    for stage, weights in enumerate(stages):
        tensors |= stage_checkpoint_names(family, manifest.stages[stage], weights)
    tensors |= local_checkpoint_names(family, local)
    return save_hf_checkpoint(source.config, tensors, out, dtype=torch.float32)


def export_swarm(initial_peers: list[str], out: Path, *, run_id: str = "swarm", timeout: float = 600.0,
                 console: Console | None = None, key: str | None = None) -> ExportReport:
    """Join the run as a client, gather every part with a progress bar, write the checkpoint. ``key``:
    the API key a keyed run needs (its token is presented to every replica and store asked)."""
    console = console or Console()
    runner = LoopThread("swarm-export")
    dht = SwarmDHT.create_client(run_id, initial_peers)
    try:
        manifest = runner.run(dht.wait_manifest(timeout))
        source = resolve_model(manifest.model)
        if source.config_hash != manifest.config_hash:
            raise ConfigError(f"{manifest.model} here has config {source.config_hash[:12]}, the run trains "
                              f"{manifest.config_hash[:12]}")
        calls = runner.run(ClientCalls.open(dht, key))
        try:
            return _export(runner, dht, calls.calls, manifest, source, Path(out), timeout, console)
        finally:
            runner.run(calls.close(), timeout=15)
    finally:
        dht.shutdown()
        runner.stop()


def _export(runner: LoopThread, dht: SwarmDHT, transport: Transport, manifest: Manifest, source: ModelSource,
            out: Path, timeout: float, console: Console) -> ExportReport:
    client = StageClient(transport, timeout=timeout)
    store = StoreClient(transport, dht.stores, timeout=timeout)
    report = ExportReport(out=out)
    stages = []
    with Progress(TextColumn("[bold]export[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("", total=manifest.num_stages + 2)
        for stage in range(manifest.num_stages):
            progress.update(task, description=f"stage {stage} {manifest.stages[stage]}")
            records = runner.run(dht.stage_records(stage))
            weights, where = runner.run(gather_stage(manifest, stage, records, client, store))
            stages.append(weights)
            report.sources[part_name(stage)] = where
            progress.advance(task)
        progress.update(task, description="trainer's local parts")
        local, report.sources[LOCAL_PART] = _local_weights(runner, store, manifest, source)
        progress.advance(task)
        progress.update(task, description=f"writing {out}")
        write_checkpoint(manifest, source, stages, local, out)
        progress.advance(task)
    for part, where in report.sources.items():
        style = "yellow" if "no replica" in where or "model files" in where else "green"
        console.print(f"  {escape(part)}: [{style}]{escape(where)}[/]")
    console.print(f"[bold green]exported[/] {escape(manifest.model)} ({manifest.num_layers} layers) to {escape(str(out))}")
    return report


def _local_weights(runner: LoopThread, store: StoreClient, manifest: Manifest, source: ModelSource
                   ) -> tuple[dict[str, torch.Tensor], str]:
    try:
        meta, tensors = runner.run(store.get(LOCAL_PART))
    except CheckpointMissing:
        logger.warning("no trainer has uploaded its local parts: exporting the model files' embeddings and head")
        parts = load_local_parts(source)
        return {name: p.detach() for name, p in parts.named_parameters()}, "model files (no trainer upload)"
    _check_part(meta, manifest, None)
    return weights_of(meta, tensors), f"trainer upload (step {meta.step})"

