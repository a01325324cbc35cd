"""Messages of the checkpoint store RPCs (``swarm.checkpoint.has``, ``.put``, ``.get``).

A store (the bootstrap) keeps the latest checkpoint of each *part*: ``stage-<i>`` for a stage's
parameters and AdamW state, ``local`` for a trainer's embeddings, final norm and head (see
``peers.state.snapshot``). Replicas of a stage ask ``has`` first and upload with ``put`` only when the store
lacks that step, so a step is sent once, not once per replica.

* HasRequest: no tensors.   Reply: HasResponse.
* PutRequest: one tensor per name of ``names``, in order.   Reply: PutResponse.
* GetRequest: no tensors.   Reply: GetResponse, then one tensor per name of ``names``.

Replies follow ``peers.training.protocol`` (``{"ok": ...}`` or ``{"error": ...}``).
"""

from __future__ import annotations

from pydantic import Field

from net.rpc import Message as _Message
from peers.state.snapshot import StateMeta

__all__ = [
    "CHECKPOINT_HAS",
    "CHECKPOINT_PUT",
    "CHECKPOINT_GET",
    "PART_PATTERN",
    "HasRequest",
    "HasResponse",
    "PutRequest",
    "PutResponse",
    "GetRequest",
    "GetResponse",
]

CHECKPOINT_HAS = "swarm.checkpoint.has"
CHECKPOINT_PUT = "swarm.checkpoint.put"
CHECKPOINT_GET = "swarm.checkpoint.get"
PART_PATTERN = r"^(stage-\d{1,4}|local)$"


class HasRequest(_Message):
    """Which step of ``part`` does the store hold?"""

    part: str = Field(pattern=PART_PATTERN)


class HasResponse(_Message):
    part: str
    step: int | None = Field(description="the newest stored step, None when there is none")


class PutRequest(_Message):
    """Keep this checkpoint (``meta`` says of which part and step); its tensors follow, named by ``names``."""

    meta: StateMeta
    names: list[str] = Field(min_length=1)


class PutResponse(_Message):
    part: str
    step: int
    stored: bool = Field(description="False when the store already held this step or a newer one")


class GetRequest(_Message):
    """Send the newest stored checkpoint of ``part``."""

    part: str = Field(pattern=PART_PATTERN)


class GetResponse(_Message):
    meta: StateMeta
    names: list[str]
