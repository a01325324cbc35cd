"""The microbatch schedule of a training step as a pure function: which stage computes which
microbatch, forward or backward, in what order (PiPPy-style actions).

The trainer's autograd bridge runs every forward before the local loss and every backward after it,
so the schedule is GPipe: all forwards, then all backwards. Action ``F(m, s)`` can run once
``F(m, s-1)`` has, ``B(m, s)`` once ``B(m, s+1)`` has; ordered by clock tick (``m + s`` forward,
``m + (S-1-s)`` backward), at tick ``t`` stage ``s`` works on microbatch ``t - s``, so with ``M``
microbatches and ``S`` stages a phase takes ``M + S - 1`` ticks instead of ``M x S``. Stages run the
actions given to them in list order; the executor (``trainer.pipeline``) keeps several in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from core.types import StageIndex

__all__ = ["Phase", "Action", "gpipe_schedule", "dependency", "actions_of_stage", "microbatch_rows", "MIN_AUTO_ROWS"]

MIN_AUTO_ROWS = 4


class Phase(str, Enum):
    FORWARD = "F"
    BACKWARD = "B"


@dataclass(frozen=True)
class Action:
    """Stage ``stage`` runs ``phase`` of microbatch ``microbatch`` at clock tick ``tick``."""

    tick: int
    phase: Phase
    microbatch: int
    stage: StageIndex

    def __str__(self) -> str:
        return f"{self.phase.value}{self.microbatch}.{self.stage}"


def gpipe_schedule(num_microbatches: int, num_stages: int, *, phase: Phase | None = None) -> list[Action]:
    """Every action of a GPipe step in tick order (within a tick, by stage), forwards first;
    ``phase`` keeps only that phase. A step needs at least one microbatch and one stage."""
    if num_microbatches < 1 or num_stages < 1:
        raise ValueError(f"a schedule needs at least 1 microbatch and 1 stage, got {num_microbatches} and {num_stages}")
    phases = [phase] if phase is not None else [Phase.FORWARD, Phase.BACKWARD]
    return [action for p in phases
            for action in sorted(_phase(p, num_microbatches, num_stages), key=lambda a: (a.tick, a.stage))]


def _phase(phase: Phase, num_microbatches: int, num_stages: int) -> list[Action]:
    last = num_stages - 1
    return [Action(m + (s if phase is Phase.FORWARD else last - s), phase, m, s)
            for m in range(num_microbatches) for s in range(num_stages)]


def dependency(action: Action, num_stages: int) -> Action | None:
    """The action whose output ``action`` takes as input (None: the trainer's own tensors), with
    the tick it has in the same phase's schedule."""
    if action.phase is Phase.FORWARD:
        if action.stage == 0:
            return None
        return Action(action.tick - 1, Phase.FORWARD, action.microbatch, action.stage - 1)
    if action.stage == num_stages - 1:
        return None
    return Action(action.tick - 1, Phase.BACKWARD, action.microbatch, action.stage + 1)


def actions_of_stage(schedule: list[Action], stage: StageIndex) -> list[Action]:
    """The order in which ``stage`` receives its work."""
    return [action for action in schedule if action.stage == stage]


def microbatch_rows(batch: int, num_stages: int, size: int | None = None) -> list[slice]:
    """The rows of each microbatch of a batch: ``size`` rows each, or by default twice as many
    microbatches as stages (every stage has work while the next one computes), but none of fewer than
    ``MIN_AUTO_ROWS`` rows: a batch of fewer than 8 rows stays one call, since each call costs a
    round trip and milliseconds of framing whatever its size."""
    if batch < 1 or num_stages < 1 or (size is not None and size < 1):
        raise ValueError(f"need a batch, stages and a microbatch size of at least 1, got {batch}, {num_stages}, {size}")
    count = max(1, min(2 * num_stages, batch // MIN_AUTO_ROWS))
    size = size or -(-batch // count)
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]
