"""A stage's state as data: its parameters and AdamW state, plus what they belong to.

A state is a ``StateMeta`` (frozen, versioned: run, config hash, stage, layers, optimizer step,
dtype) and a flat ``{name: tensor}`` dict. Names: ``param/<parameter name>`` for every parameter of
the module, and, for each parameter the optimizer holds state for, ``exp_avg/<name>``,
``exp_avg_sq/<name>`` and ``step/<name>`` (0-dim), exactly torch's AdamW state. The same pair
travels over ``swarm.stage.state``, is written to checkpoint files and kept by the checkpoint store.
The trainer's local parts (embeddings, final norm, head) use the format too, with ``stage=None``.

``capture_state`` and ``apply_state`` touch the module and optimizer: call them on the peer's
compute thread, so no optimizer step can run in the middle of a copy.
"""

from __future__ import annotations

from typing import Mapping

import torch
from pydantic import Field, model_validator

from core.messages import FrozenModel
from core.types import LayerRange, StageIndex
from core.errors import StateMismatch

__all__ = [
    "STATE_VERSION",
    "LOCAL_PART",
    "StateIdentity",
    "StateMeta",
    "part_name",
    "capture_state",
    "check_state",
    "apply_state",
    "parameters_of",
]

STATE_VERSION = 1
LOCAL_PART = "local"
_PARAM, _OPTIMIZER_KINDS = "param", ("exp_avg", "exp_avg_sq", "step")

TensorDict = dict[str, torch.Tensor]


class StateIdentity(FrozenModel):
    """What a state must belong to before a peer loads it: the run and the model's config."""

    run_id: str = Field(min_length=1, max_length=64)
    config_hash: str = Field(min_length=1, max_length=128)


class StateMeta(FrozenModel):
    """Describes a state's tensors. ``stage`` and ``layers`` are None for a trainer's local parts."""

    version: int = STATE_VERSION
    run_id: str = Field(min_length=1, max_length=64)
    config_hash: str = Field(min_length=1, max_length=128)
    stage: StageIndex | None = Field(None, ge=0)
    layers: LayerRange | None = None
    step: int = Field(ge=0, description="optimizer steps applied to these parameters")
    dtype: str = Field(pattern="^(float32|float16|bfloat16)$")
    with_optimizer: bool = True

    @model_validator(mode="after")
    def _stage_has_layers(self) -> "StateMeta":
        if (self.stage is None) != (self.layers is None):
            raise ValueError("stage and layers are given together (a stage) or not at all (local parts)")
        return self

    @property
    def part(self) -> str:
        return part_name(self.stage)

    @property
    def identity(self) -> StateIdentity:
        return StateIdentity(run_id=self.run_id, config_hash=self.config_hash)


def part_name(stage: StageIndex | None) -> str:
    """The name a checkpoint store files a state under: ``stage-<i>``, or ``local`` for a trainer's."""
    return LOCAL_PART if stage is None else f"stage-{stage}"


def parameters_of(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Named parameters, each shared parameter once (a tied head is its embedding)."""
    return dict(module.named_parameters())


def capture_state(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    identity: StateIdentity,
    step: int,
    stage: StageIndex | None = None,
    layers: LayerRange | None = None,
) -> tuple[StateMeta, TensorDict]:
    """Copy the parameters (and, given an optimizer, its state) into new tensors in host memory
    (a stage on a GPU sends and files its state from there)."""
    params = parameters_of(module)
    dtype = next(iter(params.values())).dtype
    tensors: TensorDict = {f"{_PARAM}/{name}": p.detach().to("cpu", copy=True) for name, p in params.items()}
    if optimizer is not None:
        for name, param in params.items():
            state = optimizer.state.get(param)
            if state:
                tensors.update({f"{kind}/{name}": torch.as_tensor(state[kind]).detach().to("cpu", copy=True)
                                for kind in _OPTIMIZER_KINDS})
    meta = StateMeta(run_id=identity.run_id, config_hash=identity.config_hash, stage=stage, layers=layers,
                     step=step, dtype=str(dtype).removeprefix("torch."), with_optimizer=optimizer is not None)
    return meta, tensors


def check_state(
    meta: StateMeta,
    tensors: Mapping[str, torch.Tensor],
    module: torch.nn.Module,
    *,
    identity: StateIdentity,
    stage: StageIndex | None,
    layers: LayerRange | None,
    need_optimizer: bool = True,
) -> None:
    """Refuse (``StateMismatch`` naming the difference) a state that does not fit ``module`` exactly."""
    _check_meta(meta, identity, stage, layers, need_optimizer)
    params = parameters_of(module)
    _check_names(meta, set(tensors), params)
    for key, tensor in tensors.items():
        kind, _, name = key.partition("/")
        param = params[name]
        want_shape, want_dtype = ((), torch.float32) if kind == "step" else (param.shape, param.dtype)
        if tuple(tensor.shape) != tuple(want_shape) or tensor.dtype != want_dtype:
            raise StateMismatch(f"{key}: got {tensor.dtype} {list(tensor.shape)}, this stage has "
                                f"{want_dtype} {list(want_shape)}")


def _check_meta(meta: StateMeta, identity: StateIdentity, stage: StageIndex | None, layers: LayerRange | None,
                need_optimizer: bool) -> None:
    if meta.version != STATE_VERSION:
        raise StateMismatch(f"state format version {meta.version}; this peer reads {STATE_VERSION}")
    if meta.run_id != identity.run_id:
        raise StateMismatch(f"the state is of run {meta.run_id!r}, not {identity.run_id!r}")
    if meta.config_hash != identity.config_hash:
        raise StateMismatch(f"the state is of model config {meta.config_hash[:12]}, this run trains "
                            f"{identity.config_hash[:12]}")
    if meta.stage != stage or meta.layers != layers:
        raise StateMismatch(f"the state is of {meta.part} (layers {meta.layers}), not {part_name(stage)} "
                            f"(layers {layers})")
    if need_optimizer and not meta.with_optimizer:
        raise StateMismatch(f"the state of {meta.part} has no optimizer state; a replica needs it")


def _check_names(meta: StateMeta, keys: set[str], params: Mapping[str, torch.nn.Parameter]) -> None:
    wanted = {f"{_PARAM}/{name}" for name in params}
    missing = sorted(wanted - keys)
    if missing:
        raise StateMismatch(f"the state of {meta.part} lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
    known = wanted | {f"{kind}/{name}" for kind in _OPTIMIZER_KINDS for name in params}
    unknown = sorted(keys - known)
    if unknown:
        raise StateMismatch(f"the state of {meta.part} has tensors this stage does not: {unknown[:3]}")
    for name in params:
        present = [f"{kind}/{name}" in keys for kind in _OPTIMIZER_KINDS]
        if any(present) and not all(present):
            raise StateMismatch(f"the optimizer state of {name} is incomplete (needs {', '.join(_OPTIMIZER_KINDS)})")


def apply_state(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: StateMeta,
    tensors: Mapping[str, torch.Tensor],
    *,
    identity: StateIdentity,
    stage: StageIndex | None = None,
    layers: LayerRange | None = None,
) -> None:
    """Check ``tensors`` against the module, then copy them into its parameters and the optimizer.
    Nothing is changed when the check fails."""
    check_state(meta, tensors, module, identity=identity, stage=stage, layers=layers)
    with torch.no_grad():
        for name, param in parameters_of(module).items():
            param.copy_(tensors[f"{_PARAM}/{name}"])
            optimizer.state.pop(param, None)
            if f"step/{name}" in tensors:
                optimizer.state[param] = {
                    kind: tensors[f"{kind}/{name}"].to("cpu" if kind == "step" else param.device, copy=True)
                    for kind in _OPTIMIZER_KINDS
                }
