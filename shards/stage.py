"""``StageModule``: a contiguous range of transformer blocks, loaded from only their own tensors."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from shards.families import Family, family_of, num_layers
from shards.source import ModelSource, resolve_model
from shards.types import LayerRange
from swarm.errors import ModelLoadError

__all__ = ["StageModule", "load_stage"]


class StageModule(nn.Module):
    """Layers ``[start, end)`` of a causal LM: hidden states in, hidden states out.

    The stage builds the attention mask (causal, plus padding from a 2-D ``attention_mask``) and,
    for rotary families, the position embeddings itself, exactly as the transformers model does, so
    a chain of stages computes what the whole model computes.
    """

    def __init__(self, config: PretrainedConfig, family: Family, layers: LayerRange, blocks: list[nn.Module]):
        super().__init__()
        self.config, self.family, self.layers = config, family, layers
        self.hidden_size: int = config.hidden_size
        self.blocks = nn.ModuleList(blocks)
        self.rotary_emb = family.rotary_embedding(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
        masks = self._masks(hidden_states, attention_mask, position_ids)
        rotary = self.rotary_emb(hidden_states, position_ids=position_ids) if self.rotary_emb is not None else None
        for block in self.blocks:
            mask = masks[getattr(block, "attention_type", "full_attention")]
            hidden_states = self.family.call_block(block, hidden_states, mask, position_ids, rotary)
        return hidden_states

    def _masks(self, hidden: torch.Tensor, attention_mask, position_ids) -> dict:
        kwargs = dict(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
                      position_ids=position_ids)
        sliding = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None) or []
        full = create_causal_mask(**kwargs)
        if self.config.model_type == "mistral" and sliding is not None:
            full = create_sliding_window_causal_mask(**kwargs)
        masks = {"full_attention": full}
        if "sliding_attention" in layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks


def load_stage(source: ModelSource | str, layers: LayerRange, *, dtype: torch.dtype = torch.float32) -> StageModule:
    """Build the blocks of ``layers`` and fill them with their tensors, read from the checkpoint alone."""
    source = resolve_model(source)
    config = source.config
    family = family_of(config)
    total = num_layers(config)
    if layers.end > total:
        raise ModelLoadError(f"layers {layers} are outside {source.name}, which has {total} layers")
    per_layer: dict[int, dict[str, str]] = {i: {} for i in layers}
    for name in source.tensor_names():
        found = family.layer_of(name)
        if found is not None and found[0] in layers:
            per_layer[found[0]][found[1]] = name
    tensors = source.load(name for names in per_layer.values() for name in names.values())
    blocks = [_build_block(family, config, i, {inner: tensors[name] for inner, name in per_layer[i].items()}, dtype)
              for i in layers]
    stage = StageModule(config, family, layers, blocks)
    return stage.to(dtype)


def _build_block(family: Family, config: PretrainedConfig, index: int, state: dict[str, torch.Tensor],
                 dtype: torch.dtype) -> nn.Module:
    if not state:
        raise ModelLoadError(f"the checkpoint has no tensors for layer {index}")
    cls = family.block_class(config)
    with torch.device("meta"):
        block = cls(config, layer_idx=index)
    missing = {name for name, _ in block.named_parameters()} - set(state)
    if missing:
        raise ModelLoadError(f"layer {index} is missing tensors in the checkpoint: {sorted(missing)[:5]}")
    block.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    leftover = [name for name, t in list(block.named_parameters()) + list(block.named_buffers()) if t.is_meta]
    if leftover:
        raise ModelLoadError(f"layer {index}: no value for {leftover[:5]} in the checkpoint")
    return block
