"""The trainer-side parts of a causal LM: input embeddings, final norm and LM head, plus the loss."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.loss.loss_utils import ForCausalLMLoss

from shards.families import Family, family_of
from shards.source import ModelSource, resolve_model
from swarm.errors import ModelLoadError

__all__ = ["LocalParts", "load_local_parts", "causal_lm_loss"]

# canonical checkpoint names of the local parts, per family: (embedding, positions, norm prefix, head)
_NAMES = {
    "gpt2": ("wte.weight", "wpe.weight", "ln_f.", "lm_head.weight"),
    "llama": ("model.embed_tokens.weight", None, "model.norm.", "lm_head.weight"),
}


class LocalParts(nn.Module):
    """Embeddings (+ GPT-2's learned positions), final norm and LM head, kept on the trainer so that
    any loss works; the LM head shares the embedding's ``Parameter`` when the config ties them."""

    def __init__(self, config: PretrainedConfig, family: Family):
        super().__init__()
        self.config, self.family = config, family
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = (
            nn.Embedding(config.n_positions, config.hidden_size) if family.name == "gpt2" else None
        )
        self.norm = family.norm_class(config)()
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.tied:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", True))

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.embed_positions is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            hidden = hidden + self.embed_positions(position_ids)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


def load_local_parts(source: ModelSource | str, *, dtype: torch.dtype = torch.float32) -> LocalParts:
    """Build the local parts and fill them from the checkpoint's embedding, norm and head tensors."""
    source = resolve_model(source)
    config = source.config
    family = family_of(config)
    embed, positions, norm, head = _NAMES[family.name]
    by_canonical = {family.canonical(name): name for name in source.tensor_names()}
    wanted = {"embed_tokens.weight": embed}
    if positions:
        wanted["embed_positions.weight"] = positions
    for canonical in by_canonical:
        if canonical.startswith(norm):
            wanted["norm." + canonical[len(norm):]] = canonical
    with torch.device("meta"):
        parts = LocalParts(config, family)
    if not parts.tied:
        wanted["lm_head.weight"] = head
    absent = [name for name in wanted.values() if name not in by_canonical]
    if absent:
        raise ModelLoadError(f"{source.name} lacks the tensors {absent} that the trainer needs")
    tensors = source.load(by_canonical[name] for name in wanted.values())
    state = {key: tensors[by_canonical[name]].to(dtype) for key, name in wanted.items()}
    parts.load_state_dict(state, strict=False, assign=True)
    if parts.tied:
        parts.lm_head.weight = parts.embed_tokens.weight
    leftover = [name for name, t in parts.named_parameters() if t.is_meta]
    if leftover:
        raise ModelLoadError(f"{source.name}: no value for {leftover} in the checkpoint")
    return parts


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss transformers' causal LMs compute: next-token cross entropy, -100 ignored, in float32."""
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])
