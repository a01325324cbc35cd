"""Activations peer to peer: ``swarm.stage.push`` and ``swarm.stage.collect``.

A trainer sends a microbatch to the first stage's peer together with its route (``PushRequest.hops``).
That peer computes its hop through its own stage handler (so it is checked, queued, counted and
credited exactly like a forward or backward called by a trainer), sends the result on to the next
hop's peer, and so on; the last hop's peer keeps its result in its ``Mailbox`` until the trainer
collects it (a call the trainer makes to that peer, so no peer ever has to dial a trainer, which may
sit behind a NAT). Gradients go the same way in reverse. The trainer's link carries a microbatch
twice instead of twice per stage.

Each hop hands on, with its result, what the hops so far reported (``PushRequest.done``), and the
last one leaves that list in the mailbox beside its result: a collected result says by itself which
peers computed it, so the trainer goes on as soon as it has it. The reply travels back along the
chain (three one-way trips on a WAN that the trainer no longer waits for) and says, if the chain
broke, which hop could not be reached and why: the trainer rebuilds what is missing through its own
fault-tolerant path (``trainer.pipeline``). A hop's own failure is its caller's to report, so every
failure is named by the peer that saw it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable

import torch

from peers.training.client import retried_call
from peers.training.protocol import (
    BACKWARD,
    COLLECT,
    FORWARD,
    PUSH,
    BackwardRequest,
    CollectRequest,
    CollectResponse,
    ForwardRequest,
    HopDone,
    HopFailed,
    PushRequest,
    PushResponse,
)
from net.rpc import guarded, ok_reply, parse_reply, parsing
from net.transport import Handler, Transport
from net.wire import width
from core.errors import BadRequest, CapacityExceeded, StageTimeout, SwarmError, WrongStage, error_from_wire
from core.types import PeerId

__all__ = ["Mailbox", "PushService", "LocalCall"]

logger = logging.getLogger(__name__)

LocalCall = Callable[[str, ForwardRequest | BackwardRequest, list[torch.Tensor]],
                    Awaitable[tuple[dict, list[torch.Tensor]]]]
"""``local(method, request, tensors)``: this peer's own ``forward`` / ``backward`` handler, given the
request parsed (a push holds the hop's request as a model: nothing to dump and parse again)."""


class Mailbox:
    """Results of pushes waiting for their trainer, by mailbox name; bounded in count and age.
    A result is whatever the service puts (``PushService``: the hops done and the tensors).

    ``put`` and ``take`` may come in either order. An entry nobody takes is dropped after ``ttl`` s
    (its trainer gave up and rebuilt the microbatch); past ``size`` entries the oldest goes."""

    def __init__(self, *, size: int = 256, ttl: float = 300.0):
        self.size, self.ttl = size, ttl
        self._entries: OrderedDict[str, tuple[float, asyncio.Future]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, name: str, result: Any) -> None:
        future = self._entry(name)
        if future.done():  # a push repeated (a retried call): the same result again, taken once
            self._entries[name] = (time.monotonic(), _resolved(result))
        else:
            future.set_result(result)

    async def take(self, name: str, timeout: float) -> Any:
        future = self._entry(name)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            raise StageTimeout(f"nothing arrived in mailbox {name} within {timeout:.0f} s") from None
        finally:
            entry = self._entries.get(name)
            if entry is not None and entry[1] is future and future.done():
                del self._entries[name]

    def _entry(self, name: str) -> asyncio.Future:
        now = time.monotonic()
        while self._entries and (len(self._entries) >= self.size or next(iter(self._entries.values()))[0] < now - self.ttl):
            old, (_, future) = self._entries.popitem(last=False)
            if not future.done():
                future.set_exception(CapacityExceeded(f"mailbox {old} was dropped: more than {self.size} "
                                                      f"waiting or older than {self.ttl:.0f} s"))
                future.exception()  # marked retrieved: its waiter (if any) gets it, nobody else will
        entry = self._entries.get(name)
        if entry is None:
            entry = (now, asyncio.get_running_loop().create_future())
            self._entries[name] = entry
        return entry[1]


def _resolved(result: Any) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future


class PushService:
    """Serves ``push`` and ``collect`` for one peer: computes a hop with ``local`` and calls the next
    hop's peer over ``transport`` (retried like any call to a peer; every hop is idempotent)."""

    def __init__(self, peer_id: PeerId, local: LocalCall, transport: Transport, *, timeout: float = 120.0,
                 attempts: int = 3, backoff: float = 0.25, mailbox: Mailbox | None = None):
        self.peer_id = peer_id
        self.local = local
        self.transport = transport
        self.timeout, self.attempts, self.backoff = timeout, attempts, backoff
        self.mailbox = mailbox or Mailbox()
        self.pushed = 0  # hops this peer computed and handed on (or kept for the trainer)

    async def register(self, transport: Transport) -> None:
        for method, handler in self.handlers().items():
            await transport.serve(method, handler)

    def handlers(self) -> dict[str, Handler]:
        return {PUSH: guarded(parsing(PushRequest, self.rpc_push), logger),
                COLLECT: guarded(parsing(CollectRequest, self.rpc_collect), logger)}

    async def rpc_push(self, request: PushRequest, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        hop, rest = request.hops[0], request.hops[1:]
        if hop.peer_id != self.peer_id:
            raise WrongStage(f"the push's hop for stage {hop.stage} is for peer {hop.peer_id[-8:]}, "
                             f"this is {self.peer_id[-8:]}")
        method, hop_request = self._hop_call(request)
        reply, out = await self.local(method, hop_request, tensors)
        if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
            raise error_from_wire(str(reply["error"].get("code")), str(reply["error"].get("message")))
        answer = reply.get("ok", {}) if isinstance(reply, dict) else {}
        done = HopDone(stage=hop.stage, peer_id=self.peer_id, compute_ms=float(answer.get("compute_ms", 0.0)),
                       optimizer_step=int(answer.get("optimizer_step", 0)))
        self.pushed += 1
        so_far = [*request.done, done]
        if not rest:
            self.mailbox.put(request.mailbox, (so_far, out))
            return ok_reply(PushResponse(done=[done])), []
        extra = [] if request.backward else tensors[width(request.wire):]  # the mask and positions go along
        onward = request.model_copy(update={"hops": rest, "done": so_far})
        tensors = [*out, *extra]
        if rest[0].peer_id == self.peer_id:  # the next stage is served here too (a span): no call to itself
            call = self.rpc_push(onward, tensors)
        else:
            call = retried_call(self.transport, rest[0].peer_id, PUSH, onward, tensors,
                                timeout=self.timeout * len(rest), attempts=self.attempts, backoff=self.backoff)
        try:
            downstream, _ = await call
            after = parse_reply(PushResponse, downstream)
        except SwarmError as e:
            logger.info("push: stage %d's peer %s failed: %s: %s", rest[0].stage, rest[0].peer_id[-8:],
                        type(e).__name__, e)
            failed = HopFailed(stage=rest[0].stage, peer_id=rest[0].peer_id, code=type(e).__name__, message=str(e))
            return ok_reply(PushResponse(done=[done], failed=failed)), []
        return ok_reply(PushResponse(done=[done, *after.done], failed=after.failed)), []

    async def rpc_collect(self, request: CollectRequest, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        if tensors:
            raise BadRequest(f"collect carries no tensors, got {len(tensors)}")
        done, out = await self.mailbox.take(request.mailbox, request.timeout)
        return ok_reply(CollectResponse(mailbox=request.mailbox, done=done)), out

    @staticmethod
    def _hop_call(request: PushRequest) -> tuple[str, ForwardRequest | BackwardRequest]:
        """The forward or backward request that computes the push's first hop here."""
        hop = request.hops[0]
        common = dict(stage=hop.stage, layers=hop.layers, request_id=hop.request_id, seed=hop.seed,
                      wire=request.wire)
        if request.backward:
            return BACKWARD, BackwardRequest(**common, num_samples=request.num_samples)
        return FORWARD, ForwardRequest(**common, train=True, has_attention_mask=request.has_attention_mask,
                                       has_position_ids=request.has_position_ids)
