"""Messages of the inference RPCs (``swarm.inference.open``, ``.step``, ``.close``).

An inference session keeps, on one peer, the attention cache of that peer's layers for one batch of
sequences, so each new token crosses the pipeline as one position instead of the whole prefix.

* OpenRequest: no tensors. Reserves ``batch_size * max_length`` tokens of cache on the peer, or is
  refused with ``CapacityExceeded`` (the session's memory is reserved up front, so a session that was
  let in never fails for lack of memory later).
* StepRequest: hidden_states[b, s, h], then attention_mask[b, start + s] if ``has_attention_mask``,
  then position_ids[b, s]. ``start`` is the number of positions the client believes are cached; the
  peer computes when it matches, replays its last reply when the client repeats the last step (its
  reply was lost), and answers ``CacheMiss`` otherwise (the client re-opens and replays).
  Reply: hidden_states[b, s, h].
* CloseRequest: no tensors; frees the session. Closing an unknown session is not an error.

Replies are ``{"ok": ...}`` / ``{"error": ...}`` as for the stage RPCs (``peers.training.protocol``).
"""

from __future__ import annotations

from pydantic import Field

from net.rpc import Message as _Message
from core.types import LayerRange, StageIndex

__all__ = [
    "OPEN",
    "STEP",
    "CLOSE",
    "MAX_SESSION_ID",
    "OpenRequest",
    "OpenResponse",
    "StepRequest",
    "StepResponse",
    "CloseRequest",
    "CloseResponse",
    "INFERENCE_REQUESTS",
]

OPEN = "swarm.inference.open"
STEP = "swarm.inference.step"
CLOSE = "swarm.inference.close"
MAX_SESSION_ID = 64


class OpenRequest(_Message):
    """Open session ``session_id`` on ``layers`` of ``stage`` for ``batch_size`` sequences of at most
    ``max_length`` positions (prompt, padding and generated tokens together)."""

    stage: StageIndex = Field(ge=0)
    layers: LayerRange
    session_id: str = Field(min_length=1, max_length=MAX_SESSION_ID)
    batch_size: int = Field(gt=0, le=4096)
    max_length: int = Field(gt=0, le=1 << 20)


class OpenResponse(_Message):
    session_id: str
    reserved_bytes: int = Field(description="cache memory set aside for the session on this peer")
    idle_timeout: float = Field(description="seconds without a step after which the peer drops the session")


class StepRequest(_Message):
    """Run the next ``s`` positions of session ``session_id``, of which ``start`` are already cached."""

    session_id: str = Field(min_length=1, max_length=MAX_SESSION_ID)
    start: int = Field(ge=0)
    has_attention_mask: bool = False


class StepResponse(_Message):
    session_id: str
    length: int = Field(description="positions cached after this step")
    compute_ms: float


class CloseRequest(_Message):
    session_id: str = Field(min_length=1, max_length=MAX_SESSION_ID)


class CloseResponse(_Message):
    session_id: str
    closed: bool = Field(description="False when the peer had no such session (already closed or expired)")


INFERENCE_REQUESTS: dict[str, type[_Message]] = {OPEN: OpenRequest, STEP: StepRequest, CLOSE: CloseRequest}
"""The request message of each inference RPC: what a peer parses a call into before it picks the stage."""
