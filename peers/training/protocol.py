"""Messages of the stage RPCs (``swarm.stage.forward``, ``.backward``, ``.step``, ``.abort``, ``.info``,
``.state``).

A call carries one of these messages (msgpack of its JSON form) plus a list of tensors; the message
says what the tensors are. Tensor order, fixed per message:

* ForwardRequest:  hidden_states[b, s, h], then attention_mask[b, s] if ``has_attention_mask``,
  then position_ids[b, s] if ``has_position_ids``.  Reply: hidden_states[b, s, h].
* BackwardRequest: grad_output[b, s, h], then (only if ``with_inputs``) the forward's tensors again,
  for a peer that no longer holds that forward's graph.  Reply: grad_input[b, s, h].

In both, every ``[b, s, h]`` tensor (request and reply) is encoded in the request's ``wire`` format
(``net.wire``): one tensor, or two (int8 codes, then block scales) for ``int8``.
* PushRequest: as ForwardRequest (``backward`` false) or as BackwardRequest without inputs (``backward``
  true), for the first of its ``hops``; each hop's peer sends its output on to the next hop's peer
  (the mask and positions travel along), the last leaves it for ``CollectRequest``.  Reply: no tensors.
* CollectRequest: no tensors.  Reply: the tensors a push left under ``mailbox`` (encoded as sent).
* KeptRequest: no tensors.  Reply: the output of the forward ``request_id`` (or with ``grad`` the input
  gradient of its backward) that this peer still keeps, encoded in ``wire``.
* StepRequest: no tensors. Applies the optimizer step that closes a collaborative step, after the
  replicas named in ``members`` have averaged their accumulated gradients.  Reply: no tensors.
* AbortRequest: no tensors. Gives up a step's averaging round that waits here for a dead member
  (answered on the event loop, while the step's call still holds the compute thread).
* StateRequest: no tensors.  Reply: one tensor per name of ``StateResponse.names``, in that order
  (the stage's parameters and optimizer state, see ``peers.state.snapshot``).

A reply is ``{"ok": <response message>}`` or ``{"error": {"code": <SwarmError class>, "message": ...}}``.
"""

from __future__ import annotations

from pydantic import Field

from core.messages import FrozenModel
from net.rpc import Message as _Message
from peers.state.snapshot import StateMeta
from net.wire import WIRE_PATTERN
from core.types import LayerRange, PeerId, StageIndex

__all__ = [
    "FORWARD",
    "BACKWARD",
    "INFO",
    "ForwardRequest",
    "ForwardResponse",
    "BackwardRequest",
    "BackwardResponse",
    "STEP",
    "StepRequest",
    "StepResponse",
    "ABORT",
    "AbortRequest",
    "AbortResponse",
    "InfoRequest",
    "InfoResponse",
    "STATE",
    "StateRequest",
    "StateResponse",
    "STAGE_REQUESTS",
    "ECHO",
    "EchoRequest",
    "EchoResponse",
    "PUSH",
    "COLLECT",
    "KEPT",
    "KeptRequest",
    "KeptResponse",
    "PushHop",
    "PushRequest",
    "HopDone",
    "HopFailed",
    "PushResponse",
    "CollectRequest",
    "CollectResponse",
]

FORWARD = "swarm.stage.forward"
BACKWARD = "swarm.stage.backward"
INFO = "swarm.stage.info"
STEP = "swarm.stage.step"
STATE = "swarm.stage.state"
ABORT = "swarm.stage.abort"
PUSH = "swarm.stage.push"
KEPT = "swarm.stage.kept"
COLLECT = "swarm.stage.collect"


class ForwardRequest(_Message):
    """Run ``layers`` of ``stage`` on the hidden states. ``train`` keeps the graph for a backward."""

    stage: StageIndex = Field(ge=0)
    layers: LayerRange
    request_id: str = Field(min_length=1, max_length=64)
    train: bool = False
    has_attention_mask: bool = False
    has_position_ids: bool = False
    seed: int | None = Field(None, ge=0, description="RNG seed for dropout, so a recompute matches")
    wire: str = Field("float32", pattern=WIRE_PATTERN, description="how hidden states travel, both ways")


class ForwardResponse(_Message):
    request_id: str
    compute_ms: float
    optimizer_step: int = Field(0, description="optimizer steps this stage has taken")


class BackwardRequest(_Message):
    """Backpropagate ``grad_output`` through the forward ``request_id`` and accumulate parameter grads.

    ``num_samples`` (rows of this microbatch) is counted; the optimizer steps only on a ``StepRequest``.
    """

    stage: StageIndex = Field(ge=0)
    layers: LayerRange
    request_id: str = Field(min_length=1, max_length=64)
    num_samples: int = Field(gt=0)
    with_inputs: bool = False
    accumulate: bool = Field(True, description="false: only the input gradient is wanted (a trainer rebuilding "
                                               "a microbatch through stages that already counted it)")
    has_attention_mask: bool = False
    has_position_ids: bool = False
    seed: int | None = Field(None, ge=0)
    wire: str = Field("float32", pattern=WIRE_PATTERN, description="how gradients and hidden states travel")


class BackwardResponse(_Message):
    request_id: str
    compute_ms: float
    optimizer_step: int = Field(description="optimizer steps this stage has taken")


class PushHop(FrozenModel):
    """One stage of a pushed microbatch: who computes it, under which request id and dropout seed."""

    stage: StageIndex = Field(ge=0)
    layers: LayerRange
    peer_id: PeerId = Field(min_length=1, max_length=128)
    request_id: str = Field(min_length=1, max_length=64)
    seed: int | None = Field(None, ge=0)


class HopDone(FrozenModel):
    stage: StageIndex
    peer_id: PeerId = Field(max_length=128)
    compute_ms: float
    optimizer_step: int


class PushRequest(_Message):
    """Activations (or gradients) peer to peer: compute ``hops[0]`` here (a training forward, or with
    ``backward`` the backward of the forward kept under its request id), then send the result to
    ``hops[1]``'s peer with ``hops[1:]``, and so on; the last hop's peer keeps its result under
    ``mailbox`` until the trainer collects it. Idempotent like the calls it is made of: a forward
    pushed again replaces the kept graph, a backward pushed again is answered from the hop's record."""

    backward: bool = False
    hops: list[PushHop] = Field(min_length=1, max_length=64)
    mailbox: str = Field(min_length=1, max_length=64)
    num_samples: int = Field(1, gt=0)
    has_attention_mask: bool = False
    has_position_ids: bool = False
    wire: str = Field("float32", pattern=WIRE_PATTERN)
    done: list[HopDone] = Field(default_factory=list, max_length=64,
                                description="the hops before this one, as their peers computed them")


class HopFailed(FrozenModel):
    """The hop a push could not hand its result to, and why (the error its caller got)."""

    stage: StageIndex
    peer_id: PeerId
    code: str
    message: str


class PushResponse(_Message):
    done: list[HopDone] = Field(description="the hops computed, from the first one on")
    failed: HopFailed | None = Field(None, description="the hop after the last one done, if it failed")


class CollectRequest(_Message):
    """Wait (up to ``timeout`` s) for what a push leaves under ``mailbox`` here, and take it."""

    mailbox: str = Field(min_length=1, max_length=64)
    timeout: float = Field(gt=0, le=3600)


class CollectResponse(_Message):
    mailbox: str
    done: list[HopDone] = Field(default_factory=list, max_length=64,
                                description="every hop of the push that left it, from the first one on")


class KeptRequest(_Message):
    """The output of the training forward ``request_id`` (``grad``: the input gradient of its backward)
    if this stage still keeps it: what a trainer that had the microbatch pushed replays another
    stage's lost backward from (``trainer.pipeline``)."""

    stage: StageIndex = Field(ge=0)
    layers: LayerRange
    request_id: str = Field(min_length=1, max_length=64)
    grad: bool = False
    wire: str = Field("float32", pattern=WIRE_PATTERN)


class KeptResponse(_Message):
    request_id: str


class StepRequest(_Message):
    """Close collaborative step ``step``: average the gradients accumulated since the last step with
    the other ``members`` (peer ids of this stage's replicas taking part, this peer included), then
    step the optimizer. Idempotent: a replica that already applied ``step`` replies as it did then.

    ``scheduled_time`` (DHT time) is when the members meet to average, the same for all of them.
    """

    stage: StageIndex = Field(ge=0)
    layers: LayerRange
    step: int = Field(ge=0)
    members: list[str] = Field(min_length=1, max_length=256)
    scheduled_time: float = 0.0


class StepResponse(_Message):
    step: int = Field(description="the collaborative step that was applied")
    optimizer_step: int = Field(description="optimizer steps this stage has taken after it")
    samples: int = Field(description="sequences this replica had accumulated for that step")
    group_size: int = Field(description="replicas whose gradients were averaged")


class AbortRequest(_Message):
    """Give up the averaging round of ``step`` now: another member of it is gone, so it cannot end
    (it would wait for ``peer.averaging_timeout``). Nothing is applied; the trainer runs the round
    again without the dead member."""

    stage: StageIndex = Field(ge=0)
    layers: LayerRange
    step: int = Field(ge=0)
    members: list[str] = Field(min_length=1, max_length=256, description="the round's members, as in its StepRequest")


class AbortResponse(_Message):
    step: int
    aborted: bool = Field(description="a round of that step was waiting here and was given up (one that had "
                                      "not started yet will fail when it does)")


class InfoRequest(_Message):
    """How a replica stands; ``stage`` picks one of a peer serving several (default: its first)."""

    stage: StageIndex | None = Field(None, ge=0)


class InfoResponse(_Message):
    peer_id: PeerId
    stage: StageIndex
    layers: LayerRange
    optimizer_step: int
    accumulated_samples: int
    requests_served: int
    errors_replied: int


class StateRequest(_Message):
    """Send this stage's current state: parameters and, with ``with_optimizer``, the AdamW state."""

    stage: StageIndex = Field(ge=0)
    layers: LayerRange
    with_optimizer: bool = True


class StateResponse(_Message):
    meta: StateMeta
    names: list[str] = Field(description="the name of each tensor of the reply, in order")


STAGE_REQUESTS: dict[str, type[_Message]] = {
    FORWARD: ForwardRequest,
    BACKWARD: BackwardRequest,
    STEP: StepRequest,
    ABORT: AbortRequest,
    INFO: InfoRequest,
    STATE: StateRequest,
    KEPT: KeptRequest,
}
"""The request message of each stage RPC: what a peer parses a call into before it picks the stage."""


# -- link probe (placement measures latency and bandwidth with it) ------------------------------------

ECHO = "swarm.probe.echo"


class EchoRequest(_Message):
    """Send the tensors back as they came: a joining peer times this to measure its links."""


class EchoResponse(_Message):
    size: int = Field(ge=0, description="bytes of tensors echoed")
