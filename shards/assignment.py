"""Layer assignment as pure functions: cutting layers into stages, and which stage a peer claims."""

from __future__ import annotations

import random
from typing import Sequence

from core.types import LayerRange

__all__ = ["stage_boundaries", "choose_stage"]


def stage_boundaries(num_layers: int, num_stages: int) -> list[LayerRange]:
    """Contiguous, as even as possible; earlier stages take the extra layers."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be at least 1, got {num_stages}")
    if num_stages > num_layers:
        raise ValueError(f"cannot cut {num_layers} layers into {num_stages} stages (at most one stage per layer)")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for index in range(num_stages):
        end = start + base + (1 if index < extra else 0)
        ranges.append(LayerRange(start=start, end=end))
        start = end
    return ranges


def choose_stage(coverage: Sequence[int], *, rng: random.Random | None = None) -> int:
    """The least-covered stage; ties go to the lowest index, or to a random one when ``rng`` is given."""
    if not coverage:
        raise ValueError("the run has no stages to choose from")
    least = min(coverage)
    candidates = [i for i, count in enumerate(coverage) if count == least]
    return rng.choice(candidates) if rng is not None else candidates[0]
