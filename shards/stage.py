"""``StageModule``: a contiguous range of transformer blocks, loaded from only their own tensors."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.initialization import no_init_weights
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from shards.families import Family, family_of, num_layers
from shards.source import ModelSource, resolve_model
from core.types import LayerRange
from core.errors import ModelLoadError

__all__ = ["StageModule", "load_stage"]

_MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


class StageModule(nn.Module):
    """Layers ``[start, end)`` of a causal LM: hidden states in, hidden states out.

    The stage builds the attention mask (causal, plus padding from a 2-D ``attention_mask`` where
    1 is a token and 0 padding, plus sliding windows where the config has them) and, for rotary
    families, the position embeddings itself, exactly as the transformers model does, so a chain
    of stages computes what the whole model computes. ``blocks[k]`` is model layer
    ``layers.start + k``; the rotary embedding stays in float32 whatever the blocks' dtype.
    """

    def __init__(self, config: PretrainedConfig, family: Family, layers: LayerRange, blocks: list[nn.Module]):
        super().__init__()
        if len(blocks) != len(layers):
            raise ValueError(f"stage {layers} needs {len(layers)} blocks, got {len(blocks)}")
        self.config, self.family, self.layers = config, family, layers
        self.hidden_size: int = config.hidden_size
        self.blocks = nn.ModuleList(blocks)
        self.rotary_emb = family.build_rotary(config)
        self._kinds = [family.attention_kind(config, index) for index in layers]

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
        for block, kind in zip(self.blocks, self._kinds):
            hidden_states = self.family.call_block(block, hidden_states, masks[kind], position_ids, rotary)
        return hidden_states

    def new_cache(self) -> DynamicCache:
        """An empty attention cache for ``step``: transformers' own ``DynamicCache`` for the whole model's
        layer layout (sliding-window layers included), of which this stage fills only its own layers."""
        return DynamicCache(config=self.config)

    def step(
        self,
        hidden_states: torch.Tensor,
        cache: Cache,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Inference with a KV cache: the new positions' hidden states in, theirs out; ``cache`` grows.

        ``attention_mask`` covers the cached and the new positions (``[batch, past + new]``), as in
        transformers' generation; masks are sized against this stage's own first layer of each kind,
        since the cache's other layers belong to other stages and stay empty here.
        """
        masks = self._masks(hidden_states, attention_mask, position_ids, cache)
        rotary = self.rotary_emb(hidden_states, position_ids=position_ids) if self.rotary_emb is not None else None
        for block, kind in zip(self.blocks, self._kinds):
            hidden_states = self.family.call_block(block, hidden_states, masks[kind], position_ids, rotary, cache)
        return hidden_states

    def _masks(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: Cache | None = None,
    ) -> dict[str, torch.Tensor | None]:
        first = {kind: self.layers.start + self._kinds.index(kind) for kind in set(self._kinds)}
        return {
            kind: _MASK_FUNCTIONS[kind](config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                        cache=cache, position_ids=position_ids,
                                        **({"layer_idx": first[kind]} if cache is not None else {}))
            for kind in set(self._kinds)
        }


def load_stage(source: ModelSource | str, layers: LayerRange, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> StageModule:
    """Build the blocks of ``layers`` and fill them with their own tensors, read from the checkpoint
    alone, straight onto ``device`` (the blocks are built on the meta device, so nothing else is
    allocated); ``dtype`` is the weights' (a peer keeps float32 masters whatever the run computes in)."""
    source = resolve_model(source)
    config = source.config
    family = family_of(config)
    total = num_layers(config)
    if layers.end > total:
        raise ModelLoadError(f"layers {layers} are outside {source.name}, which has {total} layers")
    with torch.device("meta"):
        blocks = [family.build_block(config, index) for index in layers]
    names = _checkpoint_names(source, family, layers, blocks)
    tensors = source.load((name for per_block in names for name in per_block.values()), device=device)
    for index, block, per_block in zip(layers, blocks, names):
        state = {key: _cast(tensors.pop(name), dtype) for key, name in per_block.items()}
        block.load_state_dict(state, strict=True, assign=True)
        _materialize_buffers(block, family, config, index, device)
    return StageModule(config, family, layers, blocks).to(device)


def _checkpoint_names(
    source: ModelSource, family: Family, layers: LayerRange, blocks: list[nn.Module]
) -> list[dict[str, str]]:
    """For each block, ``{state_dict key: checkpoint name}``; extra checkpoint tensors are left unread."""
    available: dict[int, dict[str, str]] = {index: {} for index in layers}
    for name in source.tensor_names():
        found = family.layer_of(name)
        if found is not None and found[0] in layers:
            available[found[0]][found[1]] = name
    names = []
    for index, block in zip(layers, blocks):
        wanted = block.state_dict().keys()
        missing = sorted(set(wanted) - set(available[index]))
        if missing:
            raise ModelLoadError(f"{source.name}: layer {index} lacks tensors {missing[:5]} in the checkpoint")
        names.append({key: available[index][key] for key in wanted})
    return names


def _materialize_buffers(block: nn.Module, family: Family, config: PretrainedConfig, index: int,
                         device: torch.device | str) -> None:
    """Non-persistent buffers (not in checkpoints) are still on meta: take them from a real, uninitialised block."""
    pending = [name for name, buffer in block.named_buffers() if buffer.is_meta]
    if not pending:
        return
    with no_init_weights():
        reference = family.build_block(config, index)
    real = dict(reference.named_buffers())
    for name in pending:
        owner, _, leaf = name.rpartition(".")
        block.get_submodule(owner).register_buffer(leaf, real[name].to(device), persistent=False)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor
