"""The base of everything that crosses a process boundary (RPC messages, DHT records, state files).

Frozen and strict: a message is a value that cannot change after it is checked, and an unknown field
is refused rather than silently dropped, so two versions of the code never half-understand each other.
``PROTOCOL_VERSION`` is the version of swarm's wire messages and records; a request that names
another is refused with ``ProtocolMismatch`` (``net.rpc.parse_request``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["PROTOCOL_VERSION", "FrozenModel"]

PROTOCOL_VERSION = 2


class FrozenModel(BaseModel):
    """Everything that crosses a process boundary: immutable, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")
