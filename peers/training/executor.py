"""The compute of one stage: forward, backward, gradient accumulation and the optimizer step.

The module lives on the peer's device (``peer.device``) with float32 master weights; requests arrive
and replies leave in host memory, so each hop crosses host and device once each way (pinned
buffers, ``shards.devices``). The run's ``dtype`` is the precision of the compute: forward and
backward under ``torch.autocast`` for bfloat16 and float16, float16's backward gradient-scaled by a
``HopScaler`` of this stage. AdamW's state is on the device too, or in host memory with
``offload_optimizer`` (``peers.training.offload``).

Runs in one worker thread per peer (see ``peers.training.service``), so the forward cache and the optimizer
are only ever touched by that thread and need no locks; the event loop stays free for the network.

Backward reuses the graph kept from the forward of the same ``request_id`` when it is still cached;
otherwise it recomputes the forward from the inputs the trainer resends (the stateless fallback that
lets any replica take a backward), with the same dropout seed so the result is identical.

A backward with ``accumulate`` false only returns the input gradient (a trainer rebuilding a
pushed microbatch through stages that already counted it, see ``trainer.pipeline``).

Gradients accumulate (summed, as ``.grad`` does locally) until a ``StepRequest`` closes the
collaborative step: then the replicas named in it sum their gradients through a ``GradientSync`` and
each applies the same AdamW step. A lone replica steps at once, with no matchmaking.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from dht.schemas import OptimizerSettings
from peers.training.averaging import GradientSync
from peers.training.offload import HostAdamW
from peers.training.sanity import MAX_ABS, insanity
from peers.training.protocol import (
    BackwardRequest,
    BackwardResponse,
    ForwardRequest,
    ForwardResponse,
    StepRequest,
    StepResponse,
)
from shards.devices import HopScaler, compute_context, to_device, to_host
from core.types import LayerRange, StageIndex
from core.errors import AveragingFailed, BadRequest, CacheMiss, StaleReplica, WrongStage

__all__ = ["StageExecutor", "ForwardInputs"]

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
_INDEX_DTYPES = {torch.int64, torch.int32}


@dataclass
class ForwardInputs:
    """The validated tensors of a forward: hidden states plus the optional mask and positions."""

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None


@dataclass
class _Cached:
    inputs: torch.Tensor
    outputs: torch.Tensor
    created: float


class StageExecutor:
    """Owns one stage's module and optimizer and executes validated requests against them."""

    def __init__(
        self,
        module: torch.nn.Module,
        stage: StageIndex,
        layers: LayerRange,
        optimizer: OptimizerSettings,
        *,
        cache_size: int = 64,
        cache_ttl: float = 300.0,
        max_tokens: int = 1 << 20,
        sync: GradientSync | None = None,
        averaging_timeout: float = 15.0,
        max_abs: float = MAX_ABS,
        precision: torch.dtype = torch.float32,
        offload_optimizer: bool = False,
    ):
        """``sync`` sums the stage's gradients with other replicas; a lone replica never uses it.
        Inputs and gradients with a value over ``max_abs`` (or not finite) are refused. ``module``
        is on its device already; ``precision`` is the run's compute dtype; ``offload_optimizer``
        keeps AdamW's state in host memory."""
        self.module = module
        self.stage = stage
        self.layers = layers
        self.hidden_size: int = module.hidden_size
        first = next(module.parameters())
        self.dtype, self.device, self.precision = first.dtype, first.device, precision
        self.scaler = HopScaler(precision == torch.float16)
        self.optimizer = (HostAdamW if offload_optimizer else torch.optim.AdamW)(
            module.parameters(),
            lr=optimizer.lr,
            betas=optimizer.betas,
            eps=optimizer.eps,
            weight_decay=optimizer.weight_decay,
        )
        self.optimizer_step = 0
        self.behind = False  # set while this replica takes the state of replicas that applied a step it missed
        self.accumulated_samples = 0
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        # replies of recent backwards by request id: a retried backward gets the same reply and
        # does not accumulate its gradient twice; with them the forward's output (``kept``)
        self._done: OrderedDict[str, tuple[BackwardResponse, torch.Tensor]] = OrderedDict()
        self._outputs: dict[str, torch.Tensor] = {}
        self._cache_size, self._cache_ttl, self._max_tokens = cache_size, cache_ttl, max_tokens
        self._max_abs = max_abs
        self.corrupt = 0.0  # TESTS ONLY (``peer.corrupt``): noise of this scale on everything returned
        self.sync, self.averaging_timeout = sync, averaging_timeout
        self._applied: OrderedDict[int, StepResponse] = OrderedDict()  # recent steps, for idempotency

    # -- validation -------------------------------------------------------------------------------

    def check_target(self, stage: StageIndex, layers: LayerRange) -> None:
        if stage != self.stage:
            raise WrongStage(f"this peer serves stage {self.stage} (layers {self.layers}), not stage {stage}")
        if layers != self.layers:
            raise WrongStage(f"this peer holds layers {self.layers} of stage {stage}, not {layers}")

    def check_inputs(self, tensors: Sequence[torch.Tensor], has_mask: bool, has_positions: bool) -> ForwardInputs:
        expected = 1 + int(has_mask) + int(has_positions)
        if len(tensors) != expected:
            raise BadRequest(f"expected {expected} tensor(s) (hidden_states{', attention_mask' * has_mask}"
                             f"{', position_ids' * has_positions}), got {len(tensors)}")
        hidden = self.check_hidden(tensors[0], "hidden_states")
        batch, seq = hidden.shape[:2]
        rest = list(tensors[1:])
        mask = self._check_index(rest.pop(0), "attention_mask", batch, seq, allow_bool=True) if has_mask else None
        positions = self._check_index(rest.pop(0), "position_ids", batch, seq) if has_positions else None
        return ForwardInputs(hidden, mask, positions)

    def check_hidden(self, tensor: torch.Tensor, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
        if tensor.dtype not in _FLOAT_DTYPES:
            raise BadRequest(f"{name} must be a floating tensor ({self.dtype}), got {tensor.dtype}")
        if tensor.dtype != self.dtype:
            raise BadRequest(f"{name} has dtype {tensor.dtype}; this stage computes in {self.dtype}")
        if tensor.ndim != 3 or tensor.shape[-1] != self.hidden_size:
            raise BadRequest(f"{name} must have shape [batch, seq, {self.hidden_size}], got {list(tensor.shape)}")
        if like is not None and tensor.shape != like.shape:
            raise BadRequest(f"{name} has shape {list(tensor.shape)}, the forward had {list(like.shape)}")
        if tensor.shape[0] * tensor.shape[1] > self._max_tokens or tensor.numel() == 0:
            raise BadRequest(f"{name} has {tensor.shape[0] * tensor.shape[1]} tokens; allowed 1..{self._max_tokens}")
        problem = insanity(tensor, self._max_abs)
        if problem is not None:
            raise BadRequest(f"{name} refused: {problem}")
        return tensor

    @staticmethod
    def _check_index(tensor: torch.Tensor, name: str, batch: int, seq: int, allow_bool: bool = False) -> torch.Tensor:
        allowed = _INDEX_DTYPES | ({torch.bool} if allow_bool else set())
        if tensor.dtype not in allowed:
            raise BadRequest(f"{name} must be an integer tensor, got {tensor.dtype}")
        if list(tensor.shape) != [batch, seq]:
            raise BadRequest(f"{name} must have shape [{batch}, {seq}], got {list(tensor.shape)}")
        return tensor.long()

    # -- compute ----------------------------------------------------------------------------------

    def forward(self, request: ForwardRequest, inputs: ForwardInputs) -> tuple[ForwardResponse, torch.Tensor]:
        started = time.perf_counter()
        if request.train:
            hidden = to_device(inputs.hidden_states, self.device).detach().requires_grad_(True)
            with torch.enable_grad(), _seeded(request.seed):
                outputs = self._run(hidden, inputs)
            self._remember(request.request_id, hidden, outputs)
        else:
            with torch.no_grad(), _seeded(request.seed):
                outputs = self._run(to_device(inputs.hidden_states, self.device), inputs)
        reply = ForwardResponse(request_id=request.request_id, compute_ms=_ms_since(started),
                                optimizer_step=self.optimizer_step)
        return reply, self._returned(outputs.detach())

    def backward(
        self, request: BackwardRequest, grad_output: torch.Tensor, inputs: ForwardInputs | None
    ) -> tuple[BackwardResponse, torch.Tensor]:
        started = time.perf_counter()
        if request.request_id in self._done:
            logger.info("backward %s was already applied; replaying its reply", request.request_id)
            return self._done[request.request_id]
        cached = self._cache.pop(request.request_id, None)
        if cached is None:
            if inputs is None:
                raise CacheMiss(f"no forward graph for request {request.request_id}; resend with inputs")
            hidden = to_device(inputs.hidden_states, self.device).detach().requires_grad_(True)
            with torch.enable_grad(), _seeded(request.seed):
                outputs = self._run(hidden, inputs)
            cached = _Cached(hidden, outputs, time.monotonic())
        self.check_hidden(grad_output, "grad_output", like=cached.outputs)
        grad_output = to_device(grad_output, self.device)
        reply = BackwardResponse(request_id=request.request_id, compute_ms=0.0, optimizer_step=self.optimizer_step)
        if not request.accumulate:  # the input gradient only: nothing counted, nothing recorded as done
            (grad_input,) = self.scaler.backward(cached.outputs, grad_output, [cached.inputs])
            reply = reply.model_copy(update={"compute_ms": _ms_since(started)})
            return reply, self._returned(grad_input.detach())
        grad_input = self._accumulate(cached, grad_output)
        self.accumulated_samples += request.num_samples
        reply = reply.model_copy(update={"compute_ms": _ms_since(started)})
        grad_input = to_host(grad_input.detach())
        self._done[request.request_id] = (reply, grad_input)
        self._outputs[request.request_id] = to_host(cached.outputs.detach())
        while len(self._done) > self._cache_size:
            self._outputs.pop(self._done.popitem(last=False)[0], None)
        return reply, self._returned(grad_input)

    def _accumulate(self, cached: _Cached, grad_output: torch.Tensor) -> torch.Tensor:
        """Backward into the parameters' ``.grad`` (summed, as locally); the input gradient. float16
        goes through the scaler, the other precisions straight through autograd."""
        if not self.scaler.enabled:
            torch.autograd.backward(cached.outputs, grad_output)
            return cached.inputs.grad
        params = [p for p in self.module.parameters() if p.requires_grad]
        grad_input, *grads = self.scaler.backward(cached.outputs, grad_output, [cached.inputs, *params])
        for param, grad in zip(params, grads):
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad + grad
        return grad_input

    def kept(self, request_id: str, grad: bool) -> torch.Tensor:
        """The output of the training forward ``request_id`` (``grad``: the input gradient its backward
        returned), while this stage keeps it: the graph until the backward, then as long as the
        backward's reply is kept. Outputs are from the parameters of that forward, also after a step."""
        if grad:
            if request_id in self._done:
                return self._returned(self._done[request_id][1])
        elif request_id in self._outputs:
            return self._returned(self._outputs[request_id])
        elif request_id in self._cache:
            return self._returned(self._cache[request_id].outputs.detach())
        raise CacheMiss(f"stage {self.stage} keeps no {'input gradient' if grad else 'output'} of request {request_id}")

    def _returned(self, tensor: torch.Tensor) -> torch.Tensor:
        """What goes back to the caller, in host memory: the tensor, or (a test's faulty peer) the
        tensor plus noise."""
        tensor = to_host(tensor)
        return tensor + self.corrupt * torch.randn_like(tensor) if self.corrupt else tensor

    def _run(self, hidden: torch.Tensor, inputs: ForwardInputs) -> torch.Tensor:
        """The stage on its device in the run's precision; the output in the masters' dtype (the
        residual stream a float32 reference carries between layers)."""
        mask, positions = inputs.attention_mask, inputs.position_ids
        with compute_context(self.device, self.precision):
            outputs = self.module(hidden, attention_mask=None if mask is None else to_device(mask, self.device),
                                  position_ids=None if positions is None else to_device(positions, self.device))
        return outputs.to(self.dtype)

    def apply_step(self, request: StepRequest, me: str) -> StepResponse:
        """Close collaborative step ``request.step``: sum the accumulated gradients with the other
        members (none: a lone replica steps at once), step AdamW, and start the next step."""
        if request.step in self._applied:
            return self._applied[request.step]
        if request.step < self.optimizer_step:  # this replica's state (e.g. downloaded) already has that step
            logger.info("stage %d is at step %d: step %d was applied before this replica took its state over",
                        self.stage, self.optimizer_step, request.step)
            return StepResponse(step=request.step, optimizer_step=self.optimizer_step, samples=0, group_size=0)
        if me not in request.members:
            raise BadRequest(f"this peer ({me[-8:]}) is not among the members of step {request.step}")
        others = [m for m in request.members if m != me]
        if request.step > self.optimizer_step:
            if others:
                raise StaleReplica(f"stage {self.stage} here is at step {self.optimizer_step}, the run at "
                                   f"step {request.step}: this replica must load the current state first")
            logger.warning("stage %d was at step %d and the run is at step %d: %d step(s) of layers %s were "
                           "lost (restored from an older checkpoint)", self.stage, self.optimizer_step,
                           request.step, request.step - self.optimizer_step, self.layers)
        params = list(self.module.parameters())
        if others:
            if self.sync is None:
                raise AveragingFailed(f"stage {self.stage} here cannot average: it has no averager")
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            summed = self.sync.sum(grads, step=request.step, members=request.members, me=me,
                                   scheduled_time=request.scheduled_time, timeout=self.averaging_timeout)
            for param, grad in zip(params, summed):
                param.grad = grad.to(param.device, param.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        reply = StepResponse(step=request.step, optimizer_step=request.step + 1,
                             samples=self.accumulated_samples, group_size=len(request.members))
        self.optimizer_step, self.accumulated_samples = request.step + 1, 0
        self._applied[request.step] = reply
        while len(self._applied) > 8:
            self._applied.popitem(last=False)
        logger.debug("stage %d applied step %d with %d member(s)", self.stage, request.step, len(request.members))
        return reply

    def abort_step(self, step: int, members: Sequence[str]) -> bool:
        """Give up the averaging round of ``step`` with ``members`` (called off the compute thread,
        which the round holds); a round that has not started yet fails when it does. True if one was
        waiting."""
        return self.sync.abort(step, members) if self.sync is not None else False

    def shutdown(self) -> None:
        if self.sync is not None:
            self.sync.shutdown()

    def _remember(self, request_id: str, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        now = time.monotonic()
        self._cache[request_id] = _Cached(inputs, outputs, now)
        while self._cache and (
            len(self._cache) > self._cache_size or next(iter(self._cache.values())).created < now - self._cache_ttl
        ):
            self._cache.popitem(last=False)


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        yield


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)
