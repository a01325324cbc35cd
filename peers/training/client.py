"""Stubs for calling a stage on a peer, with bounded retries where a retry is safe."""

from __future__ import annotations

import asyncio
import logging

import torch

from peers.training.protocol import (
    ABORT,
    BACKWARD,
    COLLECT,
    FORWARD,
    PUSH,
    INFO,
    KEPT,
    STEP,
    BackwardRequest,
    BackwardResponse,
    CollectRequest,
    CollectResponse,
    ForwardRequest,
    ForwardResponse,
    HopDone,
    InfoRequest,
    InfoResponse,
    KeptRequest,
    KeptResponse,
    PushHop,
    PushRequest,
    PushResponse,
    StepRequest,
    StepResponse,
    STATE,
    AbortRequest,
    AbortResponse,
    StateRequest,
    StateResponse,
)
from net.rpc import Outgoing, parse_reply
from peers.training.sanity import MAX_ABS, insanity
from peers.state.snapshot import StateMeta
from net.transport import Transport
from net.wire import decode, encode, width
from core.types import LayerRange, PeerId, StageIndex
from core.errors import BadRequest, CacheMiss, InvalidOutput, PeerUnavailable, ProtocolMismatch

__all__ = ["StageClient", "StageInputs", "retried_call"]

logger = logging.getLogger(__name__)

StageInputs = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
"""hidden_states, attention_mask, position_ids: what a stage's forward takes."""


class StageClient:
    """Calls ``forward`` / ``backward`` / ``info`` of stages over a ``Transport``.

    Calls are retried (``attempts`` times, with backoff) when the peer is unreachable. That is safe
    for both: a second forward only replaces the cached graph, and a peer answers a backward whose
    request id it has already applied with the same reply instead of accumulating it again. A
    ``CacheMiss`` is answered by resending the forward's inputs.
    """

    def __init__(self, transport: Transport, *, timeout: float = 120.0, attempts: int = 3, backoff: float = 0.5,
                 max_abs: float = MAX_ABS, wire: str = "float32"):
        """Outputs and gradients coming back with a value over ``max_abs`` (or not finite), or with
        another shape than the hidden states sent, raise ``InvalidOutput``. ``wire``: how hidden
        states and gradients travel (the run's ``Manifest.wire``)."""
        self.transport = transport
        self.timeout, self.attempts, self.backoff = timeout, attempts, backoff
        self.max_abs, self.wire = max_abs, wire

    async def forward(
        self,
        peer_id: PeerId,
        stage: StageIndex,
        layers: LayerRange,
        request_id: str,
        inputs: StageInputs,
        *,
        train: bool,
        seed: int | None = None,
    ) -> tuple[torch.Tensor, ForwardResponse]:
        hidden, mask, positions = inputs
        request = ForwardRequest(
            stage=stage, layers=layers, request_id=request_id, train=train, seed=seed,
            has_attention_mask=mask is not None, has_position_ids=positions is not None, wire=self.wire,
        )
        reply, out = await self._call(peer_id, FORWARD, request, self._inputs(inputs))
        response = parse_reply(ForwardResponse, reply)
        what = f"stage {stage}'s output from {peer_id[-8:]}"
        return self._sane(self._decoded(out, hidden.dtype, "forward"), hidden, what), response

    async def backward(
        self,
        peer_id: PeerId,
        stage: StageIndex,
        layers: LayerRange,
        request_id: str,
        grad_output: torch.Tensor,
        inputs: StageInputs,
        *,
        num_samples: int,
        seed: int | None = None,
        accumulate: bool = True,
    ) -> tuple[torch.Tensor, BackwardResponse]:
        hidden, mask, positions = inputs
        base = dict(stage=stage, layers=layers, request_id=request_id, num_samples=num_samples, seed=seed,
                    has_attention_mask=mask is not None, has_position_ids=positions is not None, wire=self.wire,
                    accumulate=accumulate)
        grad = encode(grad_output, self.wire)
        try:
            return await self._backward(peer_id, BackwardRequest(**base), grad, hidden)
        except CacheMiss:
            logger.debug("stage %d lost the graph of %s; resending its inputs", stage, request_id)
        tensors = grad + self._inputs(inputs)
        return await self._backward(peer_id, BackwardRequest(**base, with_inputs=True), tensors, hidden)

    async def _backward(
        self, peer_id: PeerId, request: BackwardRequest, tensors: list[torch.Tensor], hidden: torch.Tensor,
    ) -> tuple[torch.Tensor, BackwardResponse]:
        reply, out = await self._call(peer_id, BACKWARD, request, tensors)
        response = parse_reply(BackwardResponse, reply)
        what = f"stage {request.stage}'s input gradient from {peer_id[-8:]}"
        return self._sane(self._decoded(out, hidden.dtype, "backward"), hidden, what), response

    async def push(self, hops: list[PushHop], mailbox: str, tensor: torch.Tensor, *, mask: torch.Tensor | None = None,
                   positions: torch.Tensor | None = None, num_samples: int = 1,
                   backward: bool = False) -> PushResponse:
        """Send ``tensor`` (hidden states, or with ``backward`` the gradient of the last hop's output)
        along ``hops`` peer to peer (``peers.training.push``); the last hop's result waits under ``mailbox``
        on its peer (``collect``). Returns which hops were done and which one failed, if any."""
        request = PushRequest(backward=backward, hops=hops, mailbox=mailbox, num_samples=num_samples,
                              has_attention_mask=mask is not None, has_position_ids=positions is not None,
                              wire=self.wire)
        tensors = encode(tensor, self.wire) + [t for t in (mask, positions) if t is not None]
        reply, _ = await self._call(hops[0].peer_id, PUSH, request, tensors, timeout=self.timeout * len(hops))
        return parse_reply(PushResponse, reply)

    async def collect(self, peer_id: PeerId, mailbox: str, like: torch.Tensor, *,
                      timeout: float) -> tuple[torch.Tensor, list[HopDone]]:
        """What a push left under ``mailbox`` on ``peer_id`` (waiting for it up to ``timeout`` s),
        checked like a stage's reply (the shape of ``like``, sane values), and the hops that the
        push's peers say computed it."""
        request = CollectRequest(mailbox=mailbox, timeout=timeout)
        reply, out = await self._call(peer_id, COLLECT, request, [], timeout=timeout + 10.0)
        done = parse_reply(CollectResponse, reply).done
        return self._sane(self._decoded(out, like.dtype, "collect"), like,
                          f"the pushed result from {peer_id[-8:]}"), done

    async def kept(self, peer_id: PeerId, stage: StageIndex, layers: LayerRange, request_id: str, like: torch.Tensor, *,
                   grad: bool = False) -> torch.Tensor:
        """The output of a training forward (``grad``: its backward's input gradient) that ``peer_id``
        still keeps (``CacheMiss`` if it does not), checked like a stage's reply."""
        request = KeptRequest(stage=stage, layers=layers, request_id=request_id, grad=grad, wire=self.wire)
        reply, out = await self._call(peer_id, KEPT, request, [])
        parse_reply(KeptResponse, reply)
        return self._sane(self._decoded(out, like.dtype, "kept"), like, f"stage {stage}'s kept tensor from {peer_id[-8:]}")

    def _sane(self, tensor: torch.Tensor, like: torch.Tensor, what: str) -> torch.Tensor:
        """``tensor`` if it has ``like``'s shape and sane values, else ``InvalidOutput``."""
        if tensor.shape != like.shape:
            raise InvalidOutput(f"{what} has shape {list(tensor.shape)}, expected {list(like.shape)}")
        problem = insanity(tensor, self.max_abs)
        if problem is not None:
            raise InvalidOutput(f"{what}: {problem}")
        return tensor

    def _inputs(self, inputs: StageInputs) -> list[torch.Tensor]:
        """A forward's tensors on the wire: the hidden states encoded, the mask and positions as they are."""
        hidden, mask, positions = inputs
        return encode(hidden, self.wire) + [t for t in (mask, positions) if t is not None]

    def _decoded(self, tensors: list[torch.Tensor], dtype: torch.dtype, what: str) -> torch.Tensor:
        if len(tensors) != width(self.wire):  # the transport checked the reply arrived whole: the peer is wrong
            raise ProtocolMismatch(f"{what} reply carried {len(tensors)} tensors instead of {width(self.wire)}")
        try:
            return decode(tensors, self.wire, dtype, f"{what} reply")
        except BadRequest as e:
            raise ProtocolMismatch(str(e)) from None

    async def step(self, peer_id: PeerId, stage: StageIndex, layers: LayerRange, step: int, members: list[str],
                   scheduled_time: float) -> StepResponse:
        request = StepRequest(stage=stage, layers=layers, step=step, members=members, scheduled_time=scheduled_time)
        reply, _ = await self._call(peer_id, STEP, request, [])
        return parse_reply(StepResponse, reply)

    async def abort(self, peer_id: PeerId, stage: StageIndex, layers: LayerRange, step: int, members: list[str]) -> AbortResponse:
        request = AbortRequest(stage=stage, layers=layers, step=step, members=members)
        reply, _ = await self._call(peer_id, ABORT, request, [])
        return parse_reply(AbortResponse, reply)

    async def info(self, peer_id: PeerId, stage: StageIndex | None = None) -> InfoResponse:
        """How ``stage`` stands on that peer (its first stage when ``None``)."""
        reply, _ = await self._call(peer_id, INFO, InfoRequest(stage=stage), [])
        return parse_reply(InfoResponse, reply)

    async def fetch_state(
        self, peer_id: PeerId, stage: StageIndex, layers: LayerRange, *, with_optimizer: bool = True,
        timeout: float | None = None,
    ) -> tuple[StateMeta, dict[str, torch.Tensor]]:
        """Download a stage's current parameters (and optimizer state) from a peer serving it.
        Retried like the other calls: a state request changes nothing on the peer."""
        request = StateRequest(stage=stage, layers=layers, with_optimizer=with_optimizer)
        reply, tensors = await self._call(peer_id, STATE, request, [], timeout=timeout or self.timeout,
                                          max_reply_bytes=None)
        response = parse_reply(StateResponse, reply)
        if len(response.names) != len(tensors) or len(set(response.names)) != len(tensors):
            raise ProtocolMismatch(f"state reply names {len(response.names)} tensors but carried {len(tensors)}")
        return response.meta, dict(zip(response.names, tensors))

    async def _call(self, peer_id: PeerId, method: str, request, tensors: list[torch.Tensor], *,
                    timeout: float | None = None, **options):
        return await retried_call(self.transport, peer_id, method, request, tensors,
                                  timeout=timeout or self.timeout, attempts=self.attempts, backoff=self.backoff,
                                  **options)


async def retried_call(transport: Transport, peer_id: PeerId, method: str, message: Outgoing, tensors: list[torch.Tensor],
                       *, timeout: float, attempts: int, backoff: float, **options):
    """``transport.call``, tried up to ``attempts`` times while the peer is unreachable
    (``PeerUnavailable``), backing off ``backoff x 2^(attempt-1)`` s and logging each attempt; any
    other error, or the last attempt's, is raised."""
    for attempt in range(1, attempts + 1):
        try:
            return await transport.call(peer_id, method, message, tensors, timeout=timeout, **options)
        except PeerUnavailable as e:
            if attempt == attempts:
                raise
            logger.warning("%s to %s, attempt %d/%d failed: %s", method, peer_id[-8:], attempt, attempts, e)
            await asyncio.sleep(backoff * 2 ** (attempt - 1))
    raise AssertionError("unreachable: the last attempt returns or raises")

