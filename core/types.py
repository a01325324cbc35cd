"""Ids and value objects shared by every layer: which stage, which layers, which peer."""

from __future__ import annotations

from typing import NewType

from pydantic import model_validator

from core.messages import FrozenModel

__all__ = ["LayerRange", "PeerId", "StageIndex"]

StageIndex = NewType("StageIndex", int)
PeerId = NewType("PeerId", str)
"""A peer's libp2p id in its base58 text form (what the DHT records and the transport name)."""


class LayerRange(FrozenModel):
    """A half-open range ``[start, end)`` of transformer layer indices."""

    start: int
    end: int

    @model_validator(mode="after")
    def _check(self) -> "LayerRange":
        if not 0 <= self.start < self.end:
            raise ValueError(f"layer range [{self.start}, {self.end}) must satisfy 0 <= start < end")
        return self

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):  # type: ignore[override]  # iterate layer indices, not fields
        return iter(range(self.start, self.end))

    def __contains__(self, layer: int) -> bool:
        return self.start <= layer < self.end

    def overlaps(self, other: "LayerRange") -> bool:
        return self.start < other.end and other.start < self.end

    def as_list(self) -> list[int]:
        return [self.start, self.end]

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"
