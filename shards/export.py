"""Assemble a standard Hugging Face causal LM from a swarm's parts and save it.

The parts are every stage's block parameters (named as in ``StageModule``: ``blocks.<k>.<inner>``)
and the trainer's ``LocalParts`` (``embed_tokens``, ``embed_positions``, ``norm``, ``lm_head``). They
are renamed to the family's canonical checkpoint names (``h.3.attn.c_attn.weight``,
``model.layers.3.mlp.up_proj.weight``, ``wte.weight``...) and copied into a transformers model built
from the run's config, whose ``save_pretrained`` writes the names and tying that
``AutoModelForCausalLM.from_pretrained`` expects (a tied head is one tensor, the embedding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from shards.families import Family, family_of, num_layers
from core.types import LayerRange
from core.errors import StateMismatch

__all__ = ["stage_checkpoint_names", "local_checkpoint_names", "build_hf_model", "save_hf_checkpoint"]

TensorMap = Mapping[str, torch.Tensor]


def stage_checkpoint_names(family: Family, layers: LayerRange, params: TensorMap) -> dict[str, torch.Tensor]:
    """A stage's ``blocks.<k>.<inner>`` parameters under their canonical checkpoint names."""
    renamed = {}
    for name, tensor in params.items():
        head, k, inner = name.split(".", 2) if name.count(".") >= 2 else (name, "", "")
        if head != "blocks" or not k.isdigit() or int(k) >= len(layers):
            raise StateMismatch(f"stage {layers} has no parameter {name!r}")
        renamed[family.layer_tensor_prefix(layers.start + int(k)) + inner] = tensor
    return renamed


def local_checkpoint_names(family: Family, params: TensorMap) -> dict[str, torch.Tensor]:
    """The trainer's local parameters under their canonical checkpoint names."""
    fixed = {"embed_tokens.weight": family.embed_name, "lm_head.weight": family.head_name}
    if family.positions_name:
        fixed["embed_positions.weight"] = family.positions_name
    renamed = {}
    for name, tensor in params.items():
        if name in fixed:
            renamed[fixed[name]] = tensor
        elif name.startswith("norm."):
            renamed[family.norm_prefix + name.removeprefix("norm.")] = tensor
        else:
            raise StateMismatch(f"the trainer's local parts have no parameter {name!r}")
    return renamed


def build_hf_model(config: PretrainedConfig, tensors: TensorMap, *, dtype: torch.dtype = torch.float32
                   ) -> PreTrainedModel:
    """The transformers model of ``config`` holding exactly ``tensors`` (canonical names): each
    parameter must be given once, with its shape, and nothing else may be."""
    family = family_of(config)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # skipping the init also skips tying a tied head to its embedding
    model = model.to(dtype)
    used = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = family.canonical(name)
            if key not in tensors:
                raise StateMismatch(f"no tensor for {key} (of {num_layers(config)} layers): is a stage missing?")
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise StateMismatch(f"{key} has shape {list(tensors[key].shape)}, the model needs {list(param.shape)}")
            param.copy_(tensors[key])
            used.add(key)
    extra = sorted(set(tensors) - used)
    if extra:
        raise StateMismatch(f"tensors the model has no parameter for: {extra[:5]}")
    return model


def save_hf_checkpoint(config: PretrainedConfig, tensors: TensorMap, out: Path, *,
                       dtype: torch.dtype = torch.float32) -> Path:
    """Write ``config.json`` + ``model.safetensors`` to ``out`` (created if needed)."""
    model = build_hf_model(config, tensors, dtype=dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out
