"""Spot checks: a trainer recomputes a fraction of a stage's forwards on another replica and compares.

A peer may return wrong outputs (a bug, bad hardware, or on purpose) that no single check on its values
catches. For a random ``rate`` of the training forwards (default 2%) the trainer sends the same inputs
with the same dropout seed to another replica of the stage at the same optimizer step and compares
the outputs within a tolerance suited to the dtype on the wire. When they disagree a third replica
decides: the replica that disagrees with the other two is caught. It is banned by this trainer at once
(its accumulated backwards of the open step are replayed on honest replicas, so it is no member of the
step and nothing it computed is applied), the microbatch goes on with the honest output, and a signed
``BanReport`` in the DHT (``dht.bans``), carrying what the check saw (``BanEvidence``: the digests of
the inputs and of the three outputs, the witnesses, the gap), makes every trainer, peer and bootstrap
leave it out once a second key holder agrees. Two
replicas that disagree with no third to decide are a *dispute*: logged and counted, nobody is banned
(which one lies cannot be told, and banning both would stop the stage).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping, Sequence

import torch

from dht.schemas import BanEvidence, BanReport
from dht.schemas import PeerRecord
from peers.training.client import StageClient, StageInputs
from core.types import LayerRange, PeerId, StageIndex
from core.errors import SwarmError

__all__ = ["SpotChecker", "Verdict", "TOLERANCE", "WIRE_TOLERANCE", "agree", "run_tolerance", "digest", "BanList",
           "without_banned"]

logger = logging.getLogger(__name__)

TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
"""Relative and absolute tolerance per dtype: replicas on other hardware or kernels differ in the
last bits; a peer that corrupts its outputs differs by far more."""

WIRE_TOLERANCE: dict[str, float] = {"float32": 0.0, "float16": 1e-2, "bfloat16": 5e-2, "int8": 2e-2}
"""The least tolerance an output that crossed the wire in this format needs: two replicas whose float32
results differ in the last bits can round to neighbouring float16 values, and, in int8, to neighbouring
steps of 1/127 of their block's largest value. For int8 the figure bounds the relative norm of the
difference (one step apart here and there), not each value."""


def run_tolerance(dtype: str, tolerance: float | None = None) -> float | None:
    """The spot checks' tolerance in a run computing in ``dtype`` (the manifest's): ``tolerance`` when
    set; else, under mixed precision, that of the compute dtype (outputs travel as float32, but
    replicas on other GPUs or kernels round their bfloat16 / float16 matmuls differently); else None
    (by the outputs' own dtype)."""
    if tolerance is not None or dtype == "float32":
        return tolerance
    return TOLERANCE[getattr(torch, dtype)]


def agree(a: torch.Tensor, b: torch.Tensor, tolerance: float | None = None, wire: str = "float32") -> bool:
    """Whether two replicas' outputs for the same input, received in ``wire`` format, are the same
    computation."""
    if a.shape != b.shape:
        return False
    tol = tolerance if tolerance is not None else max(TOLERANCE.get(a.dtype, 1e-2), WIRE_TOLERANCE.get(wire, 1e-2))
    if wire == "int8":
        return float((a.float() - b.float()).norm()) <= tol * max(float(a.float().norm()), float(b.float().norm()))
    return bool(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol))


def digest(*tensors: torch.Tensor | None) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes (None counts as such): what ``BanEvidence``
    names. Any dtype (bfloat16 has no numpy form, so the bytes are read as uint8)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none;")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, finite (a NaN or an overflow counts as the largest gap the evidence can carry)."""
    gap = float((a.float() - b.float()).abs().max()) if a.shape == b.shape else float("inf")
    return gap if gap == gap and gap < 1e30 else 1e30


@dataclass
class Verdict:
    """What a spot check found: the output to go on with, the replica that computed it, and the
    replicas caught lying (empty when they agreed or the check could not be made)."""

    output: torch.Tensor
    peer: PeerId
    caught: list[str] = field(default_factory=list)
    reason: str = ""


Reporter = Callable[[BanReport], Awaitable[object]]


class SpotChecker:
    """Decides which forwards to check, checks them, and reports the replicas caught."""

    def __init__(self, client: StageClient, *, rate: float = 0.02, tolerance: float | None = None,
                 rng: random.Random | None = None, report: Reporter | None = None, reporter_id: str = "trainer"):
        self.client, self.rate, self.tolerance = client, rate, tolerance
        self.wire = getattr(client, "wire", "float32")  # outputs compared as they crossed the wire
        self._rng = rng or random.Random()
        self._report, self._reporter_id = report, reporter_id
        self.checks = 0  # spot checks made (a second replica computed the same forward)
        self.involved: Counter[str] = Counter()  # spot checks each peer took part in (checked or checking)
        self._first_disagreement: dict[str, int] = {}  # peer -> which of its checks first disagreed
        self.caught: list[tuple[str, int]] = []  # (peer, which check of its work found it out)
        self.disputes = 0  # disagreements no third replica could decide

    def wants(self) -> bool:
        return self.rate > 0 and self._rng.random() < self.rate

    async def check(self, stage: StageIndex, layers: LayerRange, peer: PeerId, others: Sequence[str], inputs: StageInputs,
                    seed: int, output: torch.Tensor, step: int) -> Verdict:
        """Recompute ``peer``'s ``output`` on one of ``others`` (and a third to decide a disagreement)."""
        candidates = [p for p in others if p != peer]
        self._rng.shuffle(candidates)
        if not candidates:
            return Verdict(output, peer)
        checker = candidates.pop()
        second = await self._recompute(stage, layers, checker, inputs, seed, step)
        if second is None:
            return Verdict(output, peer)
        self.checks += 1
        self.involved.update((peer, checker))
        if agree(output, second, self.tolerance, self.wire):
            return Verdict(output, peer)
        for p in (peer, checker):  # pipelined checks finish in any order: the earliest is the one that counts
            self._first_disagreement.setdefault(p, self.involved[p])
        gap = float((output.float() - second.float()).abs().max())
        logger.warning("spot check of stage %d: peers %s and %s disagree (max difference %.3g)", stage, peer[-8:],
                       checker[-8:], gap)
        for arbiter in candidates:
            third = await self._recompute(stage, layers, arbiter, inputs, seed, step)
            if third is None:
                continue
            same = [agree(second, third, self.tolerance, self.wire), agree(output, third, self.tolerance, self.wire)]
            liar = peer if same[0] else checker if same[1] else None
            if liar is not None:
                honest, accused = ((second, checker), output) if liar == peer else ((output, peer), second)
                reason = f"stage {stage} output differs from two other replicas' by up to {gap:.3g}"
                evidence = BanEvidence(stage=stage, layers=layers, step=step, inputs=digest(*inputs),
                                       accused_output=digest(accused), honest_output=digest(honest[0]),
                                       third_output=digest(third), honest_peer=honest[1], third_peer=arbiter,
                                       max_abs_diff=_gap(accused, honest[0]), third_gap=_gap(third, honest[0]))
                await self._caught(liar, reason, evidence)
                return Verdict(honest[0], honest[1], [liar], reason)
        self.disputes += 1
        logger.warning("spot check of stage %d: no third replica to decide between %s and %s", stage, peer[-8:],
                       checker[-8:])
        return Verdict(output, peer)

    async def _recompute(self, stage: StageIndex, layers: LayerRange, peer: PeerId, inputs: StageInputs, seed: int,
                         step: int) -> torch.Tensor | None:
        """``peer``'s output for the same inputs and seed, or None when it cannot be compared (it
        failed, or stands at another optimizer step: other weights)."""
        try:
            output, reply = await self.client.forward(peer, stage, layers, f"check-{uuid.uuid4().hex}", inputs,
                                                      train=False, seed=seed)
        except SwarmError as e:
            logger.info("spot check on %s not made: %s: %s", peer[-8:], type(e).__name__, e)
            return None
        return output if reply.optimizer_step == step else None

    async def _caught(self, peer: PeerId, reason: str, evidence: BanEvidence) -> None:
        if any(caught == peer for caught, _ in self.caught):  # pipelined microbatches checked it at once
            return
        at = self._first_disagreement[peer]  # a peer is caught only after a check of its work disagreed
        self.caught.append((peer, at))
        logger.warning("peer %s CAUGHT at spot check %d of its work (%d made in all): %s; banned for everyone",
                       peer[-8:], at, self.checks, reason)
        if self._report is None:
            return
        report = BanReport(peer_id=peer, stage=evidence.stage, reason=reason[:300], reporter=self._reporter_id,
                           evidence=evidence, at=time.time())
        try:
            await self._report(report)
        except Exception as e:  # the ban holds here anyway; other trainers will catch the peer themselves
            logger.warning("could not publish the ban of %s: %s", peer[-8:], e)


class BanList:
    """The run's banned peers (reported, or banned by the owner: no report), re-read at most every
    ``ttl`` s (a DHT read per route refresh)."""

    def __init__(self, read: Callable[[], Awaitable[Mapping[str, BanReport | None]]], ttl: float = 10.0):
        self._read, self._ttl = read, ttl
        self._banned: frozenset[str] = frozenset()
        self._when = float("-inf")

    async def current(self) -> frozenset[str]:
        if time.monotonic() - self._when >= self._ttl:
            try:
                self._banned = frozenset(await self._read())
            except Exception as e:  # a DHT hiccup: keep the last list, try again next time
                logger.debug("reading the ban list failed: %s", e)
            self._when = time.monotonic()
        return self._banned


async def without_banned(records: Mapping[int, Sequence[PeerRecord]], bans: BanList) -> dict[int, list[PeerRecord]]:
    """``records`` without the peers reported in the DHT."""
    banned = await bans.current()
    return {stage: [r for r in found if r.peer_id not in banned] for stage, found in records.items()}
