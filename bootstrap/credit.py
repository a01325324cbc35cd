"""How much ledger credit a peer can have earned: capped by what the run could have done while the
bootstrap saw the peer online (issue 22). Pure functions, tested with tables.

What the bootstrap uses, all from what it already observes:

- **the run's step** in a metrics round (``round_step``): the median of the steps the round's signed
  metrics reports name (trainers their step, peers their stages' steps), not the largest, so one key
  holder reporting a huge step does not lift every cap; a majority of lying reporters still can;
- **a peer's online steps** (``StateDB.online_steps``): over the metrics rounds in which the peer had a
  metrics report of role ``peer``, the run's step advance since the round before (``step_advance``);
- **tokens a step can hold** (``tokens_per_step``): ``target_batch_size`` rows x the model's maximum
  positions (``DEFAULT_MAX_POSITIONS`` when the bootstrap cannot read the model's config), times
  ``PASSES`` = 4: a served microbatch counts its tokens on the forward and again on the backward, and
  the rest is room for replays after a failover, spot-check recomputations and a peer serving more
  than one stage.

``credit_cap = tokens_per_step x (online steps + GRACE_STEPS)``; the grace covers the work of the
step a peer is in when it first shows up, before a metrics round saw it. Entries that would take a
chain's credited tokens past the cap are refused (``admit``); the chain stops at the first one, so an
honest peer that is early (its entry arrived before a round saw its steps) has it accepted at a later
submission, while a chain claiming more than the run could hold never gets past it.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["PASSES", "GRACE_STEPS", "DEFAULT_MAX_POSITIONS", "tokens_per_step", "max_positions", "round_step",
           "step_advance", "credit_cap", "admit"]

PASSES = 4
GRACE_STEPS = 2
DEFAULT_MAX_POSITIONS = 8192


def max_positions(config: Any) -> int:
    """The model's longest sequence (``n_positions`` / ``max_position_embeddings``), else the default."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_POSITIONS


def tokens_per_step(target_batch_size: int, positions: int) -> int:
    return PASSES * target_batch_size * positions


def round_step(steps: Sequence[int]) -> int | None:
    """The run's step in a round: the lower median of the reported steps (None: no report)."""
    if not steps:
        return None
    ordered = sorted(steps)
    return ordered[(len(ordered) - 1) // 2]


def step_advance(previous: int | None, step: int | None) -> int:
    """Steps the run moved since the last round: none in the first round, nor backwards."""
    if previous is None or step is None:
        return 0
    return max(step - previous, 0)


def credit_cap(per_step: int, online_steps: int) -> int:
    return per_step * (max(online_steps, 0) + GRACE_STEPS)


def admit(tokens: Sequence[int], credited: int, cap: int) -> tuple[int, str]:
    """How many of a chain's next entries (their ``tokens``, in order) fit under ``cap`` after the
    ``credited`` tokens already held, and the reason the first one that does not fit is refused."""
    total = credited
    for count, claimed in enumerate(tokens):
        if total + claimed > cap:
            return count, (f"entry {count + 1} would bring this peer's credit to {total + claimed:,} tokens, more "
                           f"than the run could have done while it was seen online ({cap:,})")
        total += claimed
    return len(tokens), ""
