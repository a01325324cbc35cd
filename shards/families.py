"""The model families swarm can split, and what differs between them.

A ``Family`` knows the checkpoint names of a layer's tensors and of the trainer-side parts, how to
build one transformer block, its final norm and rotary embedding, which attention mask each layer
takes, and how to call a block. Loading and stages are generic on top of it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from core.errors import UnsupportedArchitecture

__all__ = [
    "Family",
    "FAMILIES",
    "SUPPORTED_FAMILIES",
    "family_of",
    "num_layers",
    "kv_bytes_per_token",
    "unsupported_architecture",
]

AttentionKind = Literal["full_attention", "sliding_attention"]
SlidingRule = Literal["never", "all_if_configured", "per_layer_types"]


@dataclass(frozen=True)
class Family:
    """One supported ``model_type``: its checkpoint layout and its transformers building blocks.

    Checkpoint names are handled in *canonical* form: GPT-2 checkpoints written by ``save_pretrained``
    prefix everything but the head with ``transformer.``, while the hub's own ``gpt2`` has no prefix;
    ``canonical`` strips ``optional_prefix`` so both read the same. ``sliding`` mirrors how the
    transformers model picks sliding-window masks: never, on every layer once ``config.sliding_window``
    is set (Mistral), or per ``config.layer_types`` (Qwen2).
    """

    name: str
    block_class_name: str
    layer_prefix: str
    embed_name: str
    norm_prefix: str
    positions_name: str | None = None
    head_name: str = "lm_head.weight"
    optional_prefix: str = ""
    norm_class_name: str | None = None
    rotary_class_name: str | None = None
    sliding: SlidingRule = "never"

    @property
    def rotary(self) -> bool:
        return self.rotary_class_name is not None

    def layer_tensor_prefix(self, index: int) -> str:
        """Canonical prefix of layer ``index``'s tensors, e.g. ``model.layers.3.``."""
        return self.layer_prefix.format(i=index)

    def canonical(self, checkpoint_name: str) -> str:
        if self.optional_prefix and checkpoint_name.startswith(self.optional_prefix):
            return checkpoint_name[len(self.optional_prefix):]
        return checkpoint_name

    def layer_of(self, checkpoint_name: str) -> tuple[int, str] | None:
        """``(layer index, name inside the block)`` for a layer tensor, else None."""
        name = self.canonical(checkpoint_name)
        head = self.layer_prefix.partition("{i}")[0]
        if not name.startswith(head):
            return None
        index, _, inner = name[len(head):].partition(".")
        return (int(index), inner) if index.isdigit() and inner else None

    def build_block(self, config: PretrainedConfig, index: int) -> nn.Module:
        """Block ``index`` with the transformers class; call it under ``torch.device("meta")`` to skip init."""
        return getattr(self._module(), self.block_class_name)(config, layer_idx=index)

    def build_norm(self, config: PretrainedConfig) -> nn.Module:
        if self.norm_class_name is None:
            return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        return getattr(self._module(), self.norm_class_name)(config.hidden_size, eps=config.rms_norm_eps)

    def build_rotary(self, config: PretrainedConfig) -> nn.Module | None:
        if self.rotary_class_name is None:
            return None
        return getattr(self._module(), self.rotary_class_name)(config=config)

    def build_embeddings(self, config: PretrainedConfig) -> tuple[nn.Embedding, nn.Embedding | None]:
        """Token embeddings, and learned position embeddings where the family has them (GPT-2)."""
        tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        positions = nn.Embedding(config.n_positions, config.hidden_size) if self.positions_name else None
        return tokens, positions

    def build_head(self, config: PretrainedConfig) -> nn.Linear:
        return nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def attention_kind(self, config: PretrainedConfig, index: int) -> AttentionKind:
        """Which mask layer ``index`` attends with, as the transformers model decides it."""
        if self.sliding == "all_if_configured" and getattr(config, "sliding_window", None) is not None:
            return "sliding_attention"
        if self.sliding == "per_layer_types" and getattr(config, "layer_types", None):
            return config.layer_types[index]
        return "full_attention"

    def call_block(
        self,
        block: nn.Module,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Run one block; with a ``cache`` (inference) the block appends its keys and values to it."""
        kwargs = {"position_embeddings": position_embeddings} if self.rotary else {}
        if cache is not None:
            kwargs["cache"] = cache
        out = block(hidden, attention_mask=mask, position_ids=position_ids, use_cache=cache is not None, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _module(self) -> ModuleType:
        return importlib.import_module(f"transformers.models.{self.name}.modeling_{self.name}")


def _llama_style(name: str, prefix: str, sliding: SlidingRule = "never") -> Family:
    return Family(
        name=name, block_class_name=f"{prefix}DecoderLayer", layer_prefix="model.layers.{i}.",
        embed_name="model.embed_tokens.weight", norm_prefix="model.norm.", norm_class_name=f"{prefix}RMSNorm",
        rotary_class_name=f"{prefix}RotaryEmbedding", sliding=sliding,
    )


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        name="gpt2", block_class_name="GPT2Block", layer_prefix="h.{i}.", embed_name="wte.weight",
        positions_name="wpe.weight", norm_prefix="ln_f.", optional_prefix="transformer.",
    ),
    "llama": _llama_style("llama", "Llama"),
    "mistral": _llama_style("mistral", "Mistral", sliding="all_if_configured"),
    "qwen2": _llama_style("qwen2", "Qwen2", sliding="per_layer_types"),
}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(FAMILIES)


def unsupported_architecture(model_type: object, architectures: list[str] | None = None) -> UnsupportedArchitecture:
    """The error for a model swarm cannot split: names what was found and what is supported."""
    found = ", ".join(architectures or []) or "no architectures listed"
    return UnsupportedArchitecture(
        f"model_type {model_type!r} ({found}) is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}"
    )


def family_of(config: PretrainedConfig) -> Family:
    """The family of ``config``, or ``UnsupportedArchitecture`` naming it and what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise unsupported_architecture(model_type, getattr(config, "architectures", None))
    return FAMILIES[model_type]


def kv_bytes_per_token(config: PretrainedConfig, layers: int, dtype: torch.dtype) -> int:
    """Bytes the attention cache of ``layers`` blocks holds per token of one sequence (keys and values)."""
    heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def num_layers(config: PretrainedConfig) -> int:
    """Number of transformer blocks (``num_hidden_layers``, or GPT-2's ``n_layer``)."""
    value = getattr(config, "num_hidden_layers", None)
    return int(value if value is not None else config.n_layer)
