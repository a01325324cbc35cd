"""Inference sessions of one stage: a KV cache per session, a memory budget, an idle timeout.

Every method runs on the peer's one compute thread (``peers.inference.service`` hands them over),
so the session table and the caches need no locks.

Memory is reserved when a session opens (``batch_size * max_length`` tokens of this stage's keys and
values), not when the cache grows: a peer that is full refuses *new* sessions with
``CapacityExceeded`` and never fails a session it has let in. Sessions idle for longer than the
timeout are dropped (their client replays on a re-opened session if it comes back).

The caches live on the stage's device and grow in the run's precision (the step runs under the
same autocast as training, ``shards.devices.compute_context``); hidden states arrive and leave in
host memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from transformers.cache_utils import Cache

from peers.inference.protocol import OpenRequest, OpenResponse, StepRequest, StepResponse
from shards.devices import compute_context, to_device, to_host
from shards.families import kv_bytes_per_token
from shards.stage import StageModule
from core.types import LayerRange, StageIndex
from core.errors import BadRequest, CacheMiss, CapacityExceeded, WrongStage

__all__ = ["InferenceSessions", "admit", "idle_sessions"]

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
_INDEX_DTYPES = {torch.int64, torch.int32}


@dataclass
class _Session:
    cache: Cache
    batch_size: int
    max_length: int
    reserved: int
    last_used: float
    length: int = 0
    # (start, output) of the last step: a client whose reply was lost repeats that step
    last: tuple[int, torch.Tensor] | None = field(default=None, repr=False)


def idle_sessions(last_used: Mapping[str, float], now: float, timeout: float) -> list[str]:
    """Sessions not used for more than ``timeout`` seconds, oldest first."""
    return sorted((sid for sid, used in last_used.items() if now - used > timeout), key=last_used.__getitem__)


def admit(budget: int, reserved: int, need: int) -> str | None:
    """``None`` when a session needing ``need`` bytes fits beside ``reserved`` in ``budget``, else the
    reason for refusing it (for the ``CapacityExceeded`` message)."""
    if need > budget:
        return f"the session needs {_mib(need)} of attention cache, more than this peer's whole budget of {_mib(budget)}"
    if reserved + need > budget:
        return (f"the session needs {_mib(need)} of attention cache and only {_mib(budget - reserved)} of "
                f"{_mib(budget)} is free; try another peer or later")
    return None


class InferenceSessions:
    """The open sessions of one stage and the compute of their steps."""

    def __init__(
        self,
        module: StageModule,
        stage: StageIndex,
        layers: LayerRange,
        *,
        memory_budget: int,
        idle_timeout: float,
        max_tokens: int = 1 << 20,
        clock: Callable[[], float] = time.monotonic,
        precision: torch.dtype = torch.float32,
    ):
        """``precision``: the run's compute dtype, that of the keys and values cached."""
        self.module, self.stage, self.layers = module, stage, layers
        self.memory_budget, self.idle_timeout, self.max_tokens = memory_budget, idle_timeout, max_tokens
        first = next(module.parameters())
        self.dtype, self.device, self.precision = first.dtype, first.device, precision
        self.hidden_size: int = module.hidden_size
        self.bytes_per_token = kv_bytes_per_token(module.config, len(layers), precision)
        self._sessions: dict[str, _Session] = {}
        self.steps_computed = 0  # a step repeated after a lost reply is replayed, not counted again
        self._clock = clock

    @property
    def reserved_bytes(self) -> int:
        return sum(s.reserved for s in self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def open(self, request: OpenRequest) -> OpenResponse:
        self._check_target(request.stage, request.layers)
        self.expire()
        old = self._sessions.pop(request.session_id, None)  # a client re-opening after a lost reply
        need = self.bytes_per_token * request.batch_size * request.max_length
        refusal = admit(self.memory_budget, self.reserved_bytes, need)
        if refusal is not None:
            if old is not None:
                self._sessions[request.session_id] = old
            raise CapacityExceeded(f"stage {self.stage} refuses session {request.session_id}: {refusal}")
        self._sessions[request.session_id] = _Session(
            self.module.new_cache(), request.batch_size, request.max_length, need, self._clock())
        logger.debug("opened session %s (%d x %d tokens, %s)", request.session_id, request.batch_size,
                     request.max_length, _mib(need))
        return OpenResponse(session_id=request.session_id, reserved_bytes=need, idle_timeout=self.idle_timeout)

    def step(self, request: StepRequest, tensors: Sequence[torch.Tensor]) -> tuple[StepResponse, torch.Tensor]:
        started = time.perf_counter()
        session = self._session(request.session_id)
        hidden, mask, positions = self._check_step(session, request, tensors)
        session.last_used = self._clock()
        seq = hidden.shape[1]
        if session.last is not None and request.start == session.last[0] and session.length == request.start + seq:
            logger.info("session %s repeated its last step; replaying the reply", request.session_id)
            return self._response(request, session, started), session.last[1]
        if request.start != session.length:
            raise CacheMiss(f"session {request.session_id} holds {session.length} positions on stage {self.stage}, "
                            f"the step starts at {request.start}; re-open it and replay")
        device = self.device
        with torch.no_grad(), compute_context(device, self.precision):
            out = self.module.step(to_device(hidden, device), session.cache,
                                   None if mask is None else to_device(mask, device), to_device(positions, device))
        out = to_host(out.to(self.dtype))
        session.length += seq
        session.last = (request.start, out)
        self.steps_computed += 1
        return self._response(request, session, started), out

    def close(self, session_id: str) -> bool:
        return self._sessions.pop(session_id, None) is not None

    def expire(self) -> list[str]:
        """Drop sessions idle for longer than the timeout; returns their ids."""
        gone = idle_sessions({sid: s.last_used for sid, s in self._sessions.items()}, self._clock(),
                             self.idle_timeout)
        for sid in gone:
            del self._sessions[sid]
        if gone:
            logger.info("dropped %d idle inference session(s) on stage %d", len(gone), self.stage)
        return gone

    def _session(self, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise CacheMiss(f"stage {self.stage} has no inference session {session_id} (never opened, closed "
                            f"or idle for more than {self.idle_timeout:.0f} s); re-open it and replay")
        return session

    def _check_target(self, stage: StageIndex, layers: LayerRange) -> None:
        if stage != self.stage or layers != self.layers:
            raise WrongStage(f"this peer serves stage {self.stage} (layers {self.layers}), not stage {stage} "
                             f"(layers {layers})")

    def _check_step(
        self, session: _Session, request: StepRequest, tensors: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        expected = 2 + int(request.has_attention_mask)
        if len(tensors) != expected:
            raise BadRequest(f"a step takes {expected} tensor(s) (hidden_states, "
                             f"{'attention_mask, ' * request.has_attention_mask}position_ids), got {len(tensors)}")
        hidden = tensors[0]
        if hidden.dtype not in _FLOAT_DTYPES or hidden.dtype != self.dtype:
            raise BadRequest(f"hidden_states must be {self.dtype}, got {hidden.dtype}")
        if hidden.ndim != 3 or hidden.shape[0] != session.batch_size or hidden.shape[2] != self.hidden_size:
            raise BadRequest(f"hidden_states must have shape [{session.batch_size}, seq, {self.hidden_size}], "
                             f"got {list(hidden.shape)}")
        batch, seq = hidden.shape[:2]
        if seq == 0 or batch * seq > self.max_tokens:
            raise BadRequest(f"a step carries {batch * seq} tokens; allowed 1..{self.max_tokens}")
        if request.start + seq > session.max_length:
            raise BadRequest(f"the session was opened for {session.max_length} positions; this step would reach "
                             f"{request.start + seq}")
        rest = list(tensors[1:])
        mask = _index(rest.pop(0), "attention_mask", [batch, request.start + seq], True) \
            if request.has_attention_mask else None
        positions = _index(rest.pop(0), "position_ids", [batch, seq])
        return hidden, mask, positions

    @staticmethod
    def _response(request: StepRequest, session: _Session, started: float) -> StepResponse:
        return StepResponse(session_id=request.session_id, length=session.length,
                            compute_ms=round((time.perf_counter() - started) * 1000.0, 3))


def _index(tensor: torch.Tensor, name: str, shape: list[int], allow_bool: bool = False) -> torch.Tensor:
    if tensor.dtype not in _INDEX_DTYPES | ({torch.bool} if allow_bool else set()):
        raise BadRequest(f"{name} must be an integer tensor, got {tensor.dtype}")
    if list(tensor.shape) != shape:
        raise BadRequest(f"{name} must have shape {shape}, got {list(tensor.shape)}")
    return tensor.long()


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"
