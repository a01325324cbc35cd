"""What a checkpoint must be before a store keeps it and before a peer restores it (issue 22).

A checkpoint travels from whoever uploads it to whoever restores the stage later, so neither end
takes it on trust:

- **Names, shapes, dtypes**: exactly those of the part (``stage-<i>`` or ``local``), checked against
  the part built on the meta device from the run's model config (no memory, no weights).
- **Values**: parameters and first moments finite and within ``CHECKPOINT_MAX_ABS``; second moments
  finite and not negative; AdamW's step counters finite, between 0 and the checkpoint's step.
- **Step**: not ahead of the run (``STEP_SLACK`` steps of the newest the run's records show), so a
  forged "newer" checkpoint cannot make the store skip honest uploads from then on.
- **Size**: at most ``part_bytes`` of the part (its parameters, two moments, the step counters).

Pure functions over tensors and models, no networking.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn
from transformers import PretrainedConfig

from peers.training.sanity import insanity
from peers.state.snapshot import StateIdentity, StateMeta, check_state
from shards.families import family_of
from shards.local import LocalParts
from shards.stage import StageModule
from core.types import LayerRange
from core.errors import BadRequest, StateMismatch

__all__ = [
    "CHECKPOINT_MAX_ABS",
    "STEP_SLACK",
    "part_module",
    "part_bytes",
    "step_refusal",
    "value_problem",
    "check_checkpoint",
]

CHECKPOINT_MAX_ABS = 1e3
"""No parameter or first moment of a sane transformer comes near this (weights are O(1))."""

STEP_SLACK = 2
"""A checkpoint may be this many steps past the newest step the run's records show: records are
refreshed every few seconds and a peer checkpoints right after it stepped."""


def part_module(config: PretrainedConfig, dtype: str, layers: LayerRange | None) -> nn.Module:
    """The part's module on the meta device (shapes and dtypes, no memory): a stage's blocks, or the
    trainer's local parts when ``layers`` is None."""
    family = family_of(config)
    with torch.device("meta"):
        if layers is None:
            module: nn.Module = LocalParts(config, family)
        else:
            module = StageModule(config, family, layers, [family.build_block(config, i) for i in layers])
    return module.to(getattr(torch, dtype))


def part_bytes(module: nn.Module) -> int:
    """The largest state of ``module``: each parameter and its two AdamW moments, plus the step
    counters (float32 scalars) and 1 MiB for framing."""
    params = dict(module.named_parameters())
    return sum(3 * p.numel() * p.element_size() + 4 for p in params.values()) + (1 << 20)


def step_refusal(step: int, run_step: int) -> str | None:
    """Why a checkpoint of ``step`` is ahead of a run at ``run_step`` (None: it is not)."""
    if step > run_step + STEP_SLACK:
        return f"the checkpoint claims step {step}, but the run's records show step {run_step} at most"
    return None


def value_problem(tensors: Mapping[str, torch.Tensor], step: int, max_abs: float = CHECKPOINT_MAX_ABS) -> str | None:
    """What is wrong with a checkpoint's values (None: nothing), naming the first bad tensor."""
    for name, tensor in tensors.items():
        kind = name.partition("/")[0]
        if kind in ("param", "exp_avg"):
            why = insanity(tensor, max_abs)
        elif kind == "exp_avg_sq":
            why = insanity(tensor, math.inf) or ("negative values" if tensor.numel() and float(tensor.min()) < 0 else None)
        else:  # step counters
            value = float(tensor) if tensor.numel() == 1 else math.nan
            why = None if math.isfinite(value) and 0 <= value <= step else f"AdamW step {value} (the checkpoint is at {step})"
        if why is not None:
            return f"{name}: {why}"
    return None


def check_checkpoint(meta: StateMeta, tensors: Mapping[str, torch.Tensor], module: nn.Module,
                     identity: StateIdentity, *, run_step: int | None) -> None:
    """Refuse (``BadRequest`` naming what is wrong) a checkpoint that is not exactly ``module``'s
    part, has values no sane run has, or (given ``run_step``) runs ahead of the run."""
    try:
        check_state(meta, tensors, module, identity=identity, stage=meta.stage, layers=meta.layers,
                    need_optimizer=False)
    except StateMismatch as e:
        raise BadRequest(f"checkpoint of {meta.part} refused: {e}") from None
    why = value_problem(tensors, meta.step)
    if why is None and run_step is not None:
        why = step_refusal(meta.step, run_step)
    if why is not None:
        raise BadRequest(f"checkpoint of {meta.part} at step {meta.step} refused: {why}")
