"""Where a joining peer's stage state comes from, so that it never serves stale weights.

1. Another replica serves the stage: download its current parameters and AdamW state
   (``swarm.stage.state``), trying the next replica on failure (bounded), and check with ``info``
   that the replica has not stepped meanwhile (re-download, bounded, if it has).
2. No replica is online: restore the newest checkpoint of the stage that passes the checks (the
   stage's names, shapes and dtypes, sane values: ``peers.state.checkpoint_check``), from a checkpoint
   store (the bootstrap) or from this machine's own state dir; one that fails is skipped for the
   next newest.
3. No checkpoint at all: the weights read from the model files are the state (a new run).

If replicas are online but none of them hands its state over, the peer refuses to start rather than
serve the model files' weights beside replicas that have trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, Literal

import torch

from peers.state.checkpoint_check import value_problem
from peers.state.checkpoint_files import CheckpointDir
from peers.training.client import StageClient
from peers.training.executor import StageExecutor
from peers.state.snapshot import StateIdentity, StateMeta, apply_state, part_name
from peers.state.store_client import StoreClient
from core.errors import PeerUnavailable, StateMismatch, SwarmError
from core.types import PeerId, StageIndex

__all__ = ["Compute", "Restore", "choose_restore", "restore_order", "adopt_state", "take_state"]

logger = logging.getLogger(__name__)

Compute = Callable[..., Awaitable]
"""Runs ``fn(*args)`` on the peer's compute thread (``Peer._in_compute``)."""


@dataclass(frozen=True)
class Restore:
    """Which checkpoint to restore: from the local state dir, or from the store ``store_id``."""

    source: Literal["local", "store"]
    step: int
    store_id: str | None = None


def choose_restore(local: StateMeta | None, store: tuple[str, int] | None, identity: StateIdentity,
                   stage: StageIndex) -> Restore | None:
    """The newer of the local checkpoint (only if it is of this run, model and stage) and the
    store's; the local one on a tie, as it needs no download. None when there is neither."""
    usable = local is not None and local.identity == identity and local.stage == stage
    local_step = local.step if usable else None
    if store is not None and (local_step is None or store[1] > local_step):
        return Restore("store", store[1], store[0])
    return Restore("local", local_step) if local_step is not None else None


async def adopt_state(
    executor: StageExecutor,
    identity: StateIdentity,
    *,
    replicas: list[str],
    client: StageClient,
    store: StoreClient | None,
    local: CheckpointDir | None,
    compute: Compute,
    attempts: int = 3,
) -> str:
    """Bring ``executor`` to the stage's current state; returns where it came from, for the log."""
    if replicas:
        try:
            return await _from_replicas(executor, identity, replicas, client, compute, attempts)
        except _AllUnreachable as e:  # records of peers killed outright outlive them (up to RECORD_TTL)
            logger.warning("stage %d: %s; taking them for gone", executor.stage, e)
    for restore in await _pick_checkpoints(executor.stage, identity, store, local):
        try:
            meta, tensors, where = await _load(restore, executor.stage, store, local)
            why = value_problem(tensors, meta.step)
            if why is not None:
                raise StateMismatch(why)
            await compute(_apply, executor, identity, meta, tensors)
        except SwarmError as e:  # a checkpoint that fails the checks: the next newest one
            logger.warning("not restoring stage %d from the %s checkpoint of step %d: %s: %s", executor.stage,
                           restore.source, restore.step, type(e).__name__, e)
            continue
        logger.warning("RESTORED stage %d (layers %s) from the %s at optimizer step %d: every replica of it was "
                       "gone", executor.stage, executor.layers, where, meta.step)
        return f"{where}, step {meta.step}"
    logger.info("stage %d has no replica and no usable checkpoint: starting from the model files", executor.stage)
    return "model files"


async def _load(restore: Restore, stage: StageIndex, store: StoreClient | None,
                local: CheckpointDir | None) -> tuple[StateMeta, dict[str, torch.Tensor], str]:
    if restore.source == "store":
        meta, tensors = await store.get(part_name(stage), restore.store_id)
        return meta, tensors, f"checkpoint store {restore.store_id[-8:]}"
    meta, tensors = local.load(restore.step)
    return meta, tensors, f"local checkpoint {local.root}"


async def _from_replicas(executor: StageExecutor, identity: StateIdentity, replicas: list[str],
                         client: StageClient, compute: Compute, attempts: int) -> str:
    order = replicas[:attempts]  # the caller's order: replicas at the run's newest step first
    errors = []
    for peer_id in order:
        try:
            step = await take_state(executor, identity, peer_id, client, compute, rounds=attempts)
        except SwarmError as e:
            logger.warning("downloading stage %d's state from %s failed: %s: %s", executor.stage, peer_id[-8:],
                           type(e).__name__, e)
            errors.append(e)
            continue
        logger.info("stage %d: took the current state (optimizer step %d) from replica %s", executor.stage, step,
                    peer_id[-8:])
        return f"replica {peer_id[-8:]}, step {step}"
    if len(order) == len(replicas) and all(_unreachable(e) for e in errors):
        raise _AllUnreachable(f"none of the {len(replicas)} replica(s) its records name could be reached")
    raise PeerUnavailable(f"stage {executor.stage} is served by {len(replicas)} replica(s), but none of {len(order)} "
                          "tried handed over its state; refusing to serve stale weights")


class _AllUnreachable(PeerUnavailable):
    """Every replica the records name failed to connect: they are gone, whatever their records say."""


def _unreachable(error: SwarmError) -> bool:
    """A failure to reach the peer at all (a dial that failed), not one of a peer that answered."""
    text = str(error).lower()
    return isinstance(error, PeerUnavailable) and ("dial" in text or "connection refused" in text
                                                   or "connect failed" in text)


async def take_state(executor: StageExecutor, identity: StateIdentity, peer_id: PeerId, client: StageClient,
                     compute: Compute, *, rounds: int = 3) -> int:
    """Fetch and load a replica's state until its step still matches afterwards (bounded); returns the
    step taken. Gradients accumulated here before are dropped: they belong to a step already gone."""
    for _ in range(rounds):
        meta, tensors = await client.fetch_state(peer_id, executor.stage, executor.layers)
        await compute(_apply, executor, identity, meta, tensors)
        now = (await client.info(peer_id, executor.stage)).optimizer_step
        if now == meta.step:
            return meta.step
        logger.info("replica %s stepped from %d to %d during the download; fetching again", peer_id[-8:],
                    meta.step, now)
    logger.warning("replica %s keeps stepping; serving its state of step %d", peer_id[-8:], meta.step)
    return meta.step


async def _pick_checkpoints(stage: StageIndex, identity: StateIdentity, store: StoreClient | None,
                            local: CheckpointDir | None) -> list[Restore]:
    """Every checkpoint to try, newest first (``restore_order``)."""
    in_store = None
    if store is not None:
        try:
            in_store = await store.latest(part_name(stage))
        except SwarmError as e:  # no reachable store: the local checkpoints (if any) still count
            logger.warning("cannot ask the checkpoint stores about stage %d: %s", stage, e)
    metas = []
    for step in (local.steps() if local is not None else []):
        try:
            metas.append(local.meta(step))
        except StateMismatch as e:
            logger.warning("skipping local checkpoint step %d: %s", step, e)
    return restore_order(metas, in_store, identity, stage)


def restore_order(local: list[StateMeta], store: tuple[str, int] | None, identity: StateIdentity,
                  stage: StageIndex) -> list[Restore]:
    """The checkpoints a restore tries, newest first: the store's and each local one of this run,
    model and stage (the local one first on a tie). A restore takes the first that passes the
    checks, never merely the highest step number (a forged or corrupt one is skipped)."""
    found = [Restore("local", meta.step) for meta in local if meta.identity == identity and meta.stage == stage]
    if store is not None:
        found.append(Restore("store", store[1], store[0]))
    return sorted(found, key=lambda r: (-r.step, r.source != "local"))


def _apply(executor: StageExecutor, identity: StateIdentity, meta: StateMeta, tensors: dict[str, torch.Tensor]) -> None:
    if meta.stage != executor.stage:
        raise StateMismatch(f"asked for stage {executor.stage}, got a state of {meta.part}")
    apply_state(executor.module, executor.optimizer, meta, tensors, identity=identity, stage=executor.stage,
                layers=executor.layers)
    executor.module.zero_grad(set_to_none=True)
    executor.optimizer_step, executor.accumulated_samples = meta.step, 0
