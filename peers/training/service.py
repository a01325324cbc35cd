"""Thin RPC handlers of a serving peer: parse, hand the compute to the worker thread, reply.

Every failure of one request becomes an error reply naming what was wrong; nothing a caller sends can
stop the peer from answering the next request.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import Executor
from typing import Any, Awaitable, Callable, Sequence

import torch

from peers.training.executor import ForwardInputs, StageExecutor
from peers.training.protocol import (
    ABORT,
    BACKWARD,
    FORWARD,
    INFO,
    KEPT,
    STAGE_REQUESTS,
    STEP,
    BackwardRequest,
    ForwardRequest,
    InfoRequest,
    InfoResponse,
    KeptRequest,
    KeptResponse,
    StepRequest,
    STATE,
    AbortRequest,
    AbortResponse,
    StateRequest,
    StateResponse,
)
from net.rpc import guarded, ok_reply, parsing
from peers.state.snapshot import StateIdentity, capture_state
from net.transport import CALLER, Handler, Transport
from net.wire import decode, encode, width
from peers.training.worker import ComputeWorker, on_thread
from core.errors import AveragingFailed, BadRequest, StaleReplica, WrongStage
from core.types import PeerId

__all__ = ["StageService"]

logger = logging.getLogger(__name__)


class StageService:
    """Serves one stage's ``forward``/``backward``/``step``/``info`` over a transport."""

    def __init__(self, executor: StageExecutor, peer_id: PeerId, *, worker: Executor | None = None,
                 identity: StateIdentity | None = None):
        """``worker`` is the peer's one compute thread (the one that loaded the stage: torch keeps an
        OpenMP thread team per calling thread, and a second team costs speed); a service made
        without one owns a thread of its own. ``identity`` (run and config hash) labels the state
        this service hands out over ``swarm.stage.state``; without it the state is not shared."""
        self.executor = executor
        self.identity = identity
        self.peer_id = peer_id
        self.requests_served = 0
        self.errors_replied = 0
        self.refused_by: Counter[str] = Counter()  # malformed or insane requests per caller (peer id)
        self.on_step_failed: Callable[[int], None] | None = None  # called with the stage when a step's round fails
        # before a step's averaging round: connect to the other members (those behind NAT through their
        # relay), whom hivemind's averager, sharing this node's daemon, dials by peer id alone
        self.reach_members: Callable[[Sequence[str]], Awaitable[list[str]]] | None = None
        self._owns_worker = worker is None
        self._worker = worker or ComputeWorker(f"stage{executor.stage}")

    async def register(self, transport: Transport) -> None:
        for method, handler in self.handlers().items():
            await transport.serve(method, handler)

    def handlers(self) -> dict[str, Handler]:
        """Each RPC as a transport handler: it parses its message, then serves it."""
        return {method: self._guarded(parsing(STAGE_REQUESTS[method], rpc)) for method, rpc in self._rpcs().items()}

    def parsed_handlers(self) -> dict[str, Handler]:
        """Each RPC taking its request parsed already (a peer's router parsed it to pick the stage)."""
        return {method: self._guarded(rpc) for method, rpc in self._rpcs().items()}

    def _rpcs(self) -> dict[str, Callable]:
        return {FORWARD: self.rpc_forward, BACKWARD: self.rpc_backward, STEP: self.rpc_step, ABORT: self.rpc_abort,
                INFO: self.rpc_info, STATE: self.rpc_state, KEPT: self.rpc_kept}

    async def rpc_forward(self, request: ForwardRequest, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        self.executor.check_target(request.stage, request.layers)
        self._refuse_if_behind()
        self._admit("forward")
        inputs = self._inputs(tensors, request.wire, request.has_attention_mask, request.has_position_ids)
        reply, outputs = await self._in_worker(self.executor.forward, request, inputs)
        return ok_reply(reply), encode(outputs, request.wire)

    async def rpc_backward(self, request: BackwardRequest, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        self.executor.check_target(request.stage, request.layers)
        self._refuse_if_behind()
        self._admit("backward")
        taken = width(request.wire)
        if len(tensors) < taken:
            raise BadRequest(f"backward needs grad_output ({taken} tensor(s) in {request.wire}) first, "
                             f"got {len(tensors)} tensor(s)")
        grad_output = self.executor.check_hidden(
            decode(tensors[:taken], request.wire, self.executor.dtype, "grad_output"), "grad_output")
        inputs = None
        if request.with_inputs:
            inputs = self._inputs(tensors[taken:], request.wire, request.has_attention_mask, request.has_position_ids)
        elif len(tensors) != taken:
            raise BadRequest(f"backward without inputs takes {taken} tensor(s) in {request.wire}, got {len(tensors)}")
        reply, grad_input = await self._in_worker(self.executor.backward, request, grad_output, inputs)
        return ok_reply(reply), encode(grad_input, request.wire)

    async def rpc_kept(self, request: KeptRequest, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        self.executor.check_target(request.stage, request.layers)
        if tensors:
            raise BadRequest(f"kept takes no tensors, got {len(tensors)}")
        tensor = await self._in_worker(self.executor.kept, request.request_id, request.grad)
        return ok_reply(KeptResponse(request_id=request.request_id)), encode(tensor, request.wire)

    async def rpc_step(self, request: StepRequest, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        self.executor.check_target(request.stage, request.layers)
        if tensors:
            raise BadRequest(f"step takes no tensors, got {len(tensors)}")
        others = [m for m in request.members if m != self.peer_id]
        if others and self.reach_members is not None:
            for why in await self.reach_members(others):
                logger.warning("stage %d step %d: %s; the averaging round may not reach it", request.stage,
                               request.step, why)
        try:
            reply = await self._in_worker(self.executor.apply_step, request, self.peer_id)
        except AveragingFailed:
            if self.on_step_failed is not None:  # the other members may have applied it: find out at once
                self.on_step_failed(self.executor.stage)
            raise
        return ok_reply(reply), []

    async def rpc_abort(self, request: AbortRequest, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        """On the event loop, not the compute thread: that one is held by the round being given up."""
        self.executor.check_target(request.stage, request.layers)
        if tensors:
            raise BadRequest(f"abort takes no tensors, got {len(tensors)}")
        aborted = self.executor.abort_step(request.step, request.members)
        if aborted:
            logger.info("stage %d: gave up the averaging round of step %d (a member is gone)", request.stage,
                        request.step)
        return ok_reply(AbortResponse(step=request.step, aborted=aborted)), []

    async def rpc_info(self, request: InfoRequest, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        executor = self.executor
        if request.stage is not None and request.stage != executor.stage:
            raise WrongStage(f"this service serves stage {executor.stage}, not stage {request.stage}")
        reply = InfoResponse(
            peer_id=self.peer_id,
            stage=executor.stage,
            layers=executor.layers,
            optimizer_step=executor.optimizer_step,
            accumulated_samples=executor.accumulated_samples,
            requests_served=self.requests_served,
            errors_replied=self.errors_replied,
        )
        return ok_reply(reply), []

    async def rpc_state(self, request: StateRequest, tensors: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
        self.executor.check_target(request.stage, request.layers)
        self._refuse_if_behind()
        if tensors:
            raise BadRequest(f"a state request carries no tensors, got {len(tensors)}")
        if self.identity is None:
            raise BadRequest("this peer does not share its stage state")
        meta, state = await self._in_worker(self._capture_state, request.with_optimizer)
        names = list(state)
        return ok_reply(StateResponse(meta=meta, names=names)), [state[name] for name in names]

    def _capture_state(self, with_optimizer: bool):
        executor = self.executor
        return capture_state(executor.module, executor.optimizer if with_optimizer else None,
                             identity=self.identity, step=executor.optimizer_step, stage=executor.stage,
                             layers=executor.layers)

    def _guarded(self, rpc: Callable) -> Handler:
        return guarded(rpc, logger, outcome=self._count)

    def _count(self, error: Exception | None) -> None:
        if error is None:
            self.requests_served += 1
            return
        self.errors_replied += 1
        if isinstance(error, BadRequest):  # counted against the sender: it sent something malformed
            self.refused_by[CALLER.get() or "?"] += 1

    def _inputs(self, tensors: list[torch.Tensor], wire: str, has_mask: bool, has_positions: bool) -> ForwardInputs:
        """A forward's tensors: the hidden states decoded from ``wire`` into this stage's dtype, then checked."""
        taken = width(wire)
        if len(tensors) < taken:
            raise BadRequest(f"expected hidden_states ({taken} tensor(s) in {wire}) first, got {len(tensors)} tensor(s)")
        hidden = decode(tensors[:taken], wire, self.executor.dtype, "hidden_states")
        return self.executor.check_inputs([hidden, *tensors[taken:]], has_mask, has_positions)

    def _refuse_if_behind(self) -> None:
        """A replica that knows it missed a step the others applied computes nothing and hands out no
        state until it has taken theirs (``peers.state.resync``): callers go to another replica."""
        if self.executor.behind:
            raise StaleReplica(f"stage {self.executor.stage} here is at step {self.executor.optimizer_step}, behind "
                               "its replicas; it is taking their state")

    def _admit(self, what: str) -> None:
        if isinstance(self._worker, ComputeWorker):
            self._worker.admit(what)

    async def _in_worker(self, fn: Callable, *args) -> Any:
        return await on_thread(self._worker, fn, *args)

    def shutdown(self) -> None:
        self.executor.shutdown()
        if self._owns_worker:
            self._worker.shutdown(wait=True, cancel_futures=True)
