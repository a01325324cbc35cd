"""Messages of the data-lease RPCs (``swarm.data.lease``, ``.renew``, ``.eval``), served by the
bootstrap that owns the run's leases (``bootstrap.data``). No tensors either way.

* LeaseRequest: lease a shard of ``spec`` no live trainer holds.   Reply: Lease.
* RenewRequest: the holder's committed position; also ends the lease (``done`` or ``release``).
  Reply: RenewResponse; ``LeaseLost`` when the shard is no longer the caller's.
* EvalRequest: a held-out evaluation at a step.   Reply: EvalResponse.

The caller is the trainer the transport authenticated (``net.transport.CALLER``): a lease is held by
a peer id, and only that peer can move or end it.
"""

from __future__ import annotations

from pydantic import Field

from dht.schemas import DatasetSpec
from net.rpc import Message as _Message

__all__ = [
    "DATA_LEASE",
    "DATA_RENEW",
    "DATA_EVAL",
    "Position",
    "LeaseRequest",
    "Lease",
    "RenewRequest",
    "RenewResponse",
    "EvalRequest",
    "EvalResponse",
]

DATA_LEASE = "swarm.data.lease"
DATA_RENEW = "swarm.data.renew"
DATA_EVAL = "swarm.data.eval"


class Position(_Message):
    """Where a shard's reading stands: ``doc`` samples of the shard are behind it, and the first
    ``offset`` tokens of the next one (a sequence may end inside a document); ``tokens`` trained on
    the shard so far in this epoch; ``step``: the run's step this position was committed with."""

    doc: int = Field(0, ge=0)
    offset: int = Field(0, ge=0)
    tokens: int = Field(0, ge=0)
    step: int = Field(0, ge=0)


class LeaseRequest(_Message):
    """``ended``: ``[epoch, shard]`` of shards the caller has read to their end but not yet committed
    as done (its next commit does): they are not given back to it as its own live lease."""

    spec: DatasetSpec
    ended: list[tuple[int, int]] = Field(default_factory=list, max_length=64)


class Lease(_Message):
    """Shard ``shard`` of epoch ``epoch`` of dataset ``dataset_id`` is the caller's for ``ttl`` seconds
    (renewals extend it), to be read on from ``position``."""

    dataset_id: str = Field(max_length=32)
    epoch: int = Field(ge=0)
    shard: int = Field(ge=0)
    position: Position
    ttl: float = Field(gt=0)


class RenewRequest(_Message):
    """``position`` is committed; ``done``: the shard is read to its end; ``release``: the caller
    leaves it for another trainer to continue."""

    dataset_id: str = Field(max_length=32)
    epoch: int = Field(ge=0)
    shard: int = Field(ge=0)
    position: Position
    done: bool = False
    release: bool = False


class RenewResponse(_Message):
    ttl: float = Field(ge=0, description="seconds the lease now lasts (0 once ended)")


class EvalRequest(_Message):
    """The mean token ``loss`` over ``tokens`` held-out tokens of the weights at ``step``."""

    dataset_id: str = Field(max_length=32)
    step: int = Field(ge=0)
    loss: float
    tokens: int = Field(gt=0)


class EvalResponse(_Message):
    perplexity: float
