"""The model families swarm can split, and what differs between them.

A ``Family`` knows the checkpoint names of a layer's tensors and of the trainer-side parts, how to
build one transformer block, and how to call it. Everything else (loading, stages) is generic.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from swarm.errors import UnsupportedArchitecture

__all__ = ["Family", "FAMILIES", "SUPPORTED_FAMILIES", "family_of", "num_layers"]


@dataclass(frozen=True)
class Family:
    """One architecture family (GPT-2, or Llama-style decoders that share its layout)."""

    name: str
    model_types: tuple[str, ...]
    layer_prefix: str  # canonical checkpoint prefix of layer i, "{i}" filled in
    strip_prefixes: tuple[str, ...]  # optional prefixes some checkpoints add (hub "gpt2" has none)
    rotary: bool

    def canonical(self, checkpoint_name: str) -> str:
        for prefix in self.strip_prefixes:
            if checkpoint_name.startswith(prefix):
                return checkpoint_name[len(prefix):]
        return checkpoint_name

    def layer_of(self, checkpoint_name: str) -> tuple[int, str] | None:
        """``(layer index, name inside the block)`` for a layer tensor, else None."""
        name = self.canonical(checkpoint_name)
        head, _, rest = self.layer_prefix.partition("{i}")
        if not name.startswith(head):
            return None
        index, _, inner = name[len(head):].partition(rest or ".")
        return (int(index), inner) if index.isdigit() else None

    def block_class(self, config: PretrainedConfig) -> type[nn.Module]:
        module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
        return getattr(module, _BLOCK_CLASS[config.model_type])

    def norm_class(self, config: PretrainedConfig) -> Callable[..., nn.Module]:
        if self.name == "gpt2":
            return lambda: nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
        cls = getattr(module, _NORM_CLASS[config.model_type])
        return lambda: cls(config.hidden_size, eps=config.rms_norm_eps)

    def rotary_embedding(self, config: PretrainedConfig) -> nn.Module | None:
        if not self.rotary:
            return None
        module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
        return getattr(module, _ROTARY_CLASS[config.model_type])(config=config)

    def call_block(self, block: nn.Module, hidden: torch.Tensor, mask, position_ids, position_embeddings):
        if self.rotary:
            out = block(hidden, attention_mask=mask, position_ids=position_ids,
                        position_embeddings=position_embeddings)
        else:
            out = block(hidden, None, mask, position_ids=position_ids)
        return out[0] if isinstance(out, tuple) else out


_BLOCK_CLASS = {"gpt2": "GPT2Block", "llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer",
                "qwen2": "Qwen2DecoderLayer"}
_NORM_CLASS = {"llama": "LlamaRMSNorm", "mistral": "MistralRMSNorm", "qwen2": "Qwen2RMSNorm"}
_ROTARY_CLASS = {"llama": "LlamaRotaryEmbedding", "mistral": "MistralRotaryEmbedding",
                 "qwen2": "Qwen2RotaryEmbedding"}

FAMILIES = (
    Family("gpt2", ("gpt2",), "h.{i}.", ("transformer.",), rotary=False),
    Family("llama", ("llama", "mistral", "qwen2"), "model.layers.{i}.", (), rotary=True),
)
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)


def family_of(config: PretrainedConfig) -> Family:
    """The family of ``config``, or ``UnsupportedArchitecture`` naming it and what is supported."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    architectures = ", ".join(getattr(config, "architectures", None) or []) or "unknown architecture"
    raise UnsupportedArchitecture(
        f"model_type {model_type!r} ({architectures}) is not supported; "
        f"supported: {', '.join(SUPPORTED_FAMILIES)}"
    )


def num_layers(config: PretrainedConfig) -> int:
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)
