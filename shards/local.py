"""The trainer-side parts of a causal LM: input embeddings, final norm and LM head, plus the loss."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.loss.loss_utils import ForCausalLMLoss

from shards.families import Family, family_of
from shards.source import ModelSource, resolve_model
from core.errors import ModelLoadError

__all__ = ["LocalParts", "load_local_parts", "causal_lm_loss", "default_position_ids"]


class LocalParts(nn.Module):
    """Embeddings (+ GPT-2's learned positions), final norm and LM head, kept on the trainer so that
    any loss works. The LM head shares the embedding's ``Parameter`` when the config ties them, so
    one optimizer step updates both, as in the transformers model."""

    def __init__(self, config: PretrainedConfig, family: Family):
        super().__init__()
        self.config, self.family = config, family
        self.embed_tokens, self.embed_positions = family.build_embeddings(config)
        self.norm = family.build_norm(config)
        self.lm_head = family.build_head(config)
        if self.tied:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token (and, for GPT-2, position) embeddings: the hidden states stage 0 takes."""
        hidden = self.embed_tokens(input_ids)
        if self.embed_positions is not None:
            if position_ids is None:
                position_ids = default_position_ids(input_ids)
            hidden = hidden + self.embed_positions(position_ids)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm then LM head: the last stage's hidden states to logits."""
        return self.lm_head(self.norm(hidden))


def load_local_parts(source: ModelSource | str, *, dtype: torch.dtype = torch.float32) -> LocalParts:
    """Build the local parts and fill them from the checkpoint's embedding, norm and head tensors only."""
    source = resolve_model(source)
    family = family_of(source.config)
    with torch.device("meta"):
        parts = LocalParts(source.config, family)
    names = _checkpoint_names(source, family, parts)
    tensors = source.load(names.values())
    state = {key: tensors[name].to(dtype) for key, name in names.items()}
    parts.load_state_dict(state, strict=False, assign=True)
    if parts.tied:
        parts.lm_head.weight = parts.embed_tokens.weight
    return parts


def _checkpoint_names(source: ModelSource, family: Family, parts: LocalParts) -> dict[str, str]:
    """``{state_dict key: checkpoint name}`` for every tensor of ``parts`` (the tied head excluded)."""
    by_canonical = {family.canonical(name): name for name in source.tensor_names()}
    wanted = {"embed_tokens.weight": family.embed_name}
    if family.positions_name:
        wanted["embed_positions.weight"] = family.positions_name
    wanted |= {f"norm.{key}": family.norm_prefix + key for key in parts.norm.state_dict()}
    if not parts.tied:
        wanted["lm_head.weight"] = family.head_name
    absent = sorted(name for name in wanted.values() if name not in by_canonical)
    if absent:
        raise ModelLoadError(f"{source.name} lacks the tensors {absent} that the trainer needs")
    return {key: by_canonical[name] for key, name in wanted.items()}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What transformers' causal LMs return as ``.loss``: labels shifted by one, next-token cross
    entropy in float32, positions labelled -100 ignored, mean over the rest."""
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])


def labelled_tokens(labels: torch.Tensor) -> int:
    """The tokens ``causal_lm_loss`` averages over: labels after the shift by one, -100 excepted."""
    return int((labels[..., 1:] != -100).sum())


def causal_lm_loss_part(logits: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """``causal_lm_loss`` of some rows of a batch as a part of the whole batch's: their summed token
    losses over ``count``, the whole batch's ``labelled_tokens``. A batch's parts add up to its loss."""
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=count)


def default_position_ids(like: torch.Tensor | tuple[int, int]) -> torch.Tensor:
    """Positions transformers uses when none are given: ``0..seq-1`` on every row, padding or not.

    ``like`` is ``input_ids``, an attention mask, or a ``(batch, seq)`` shape; the result is
    ``[batch, seq]`` long, on ``like``'s device.
    """
    if isinstance(like, torch.Tensor):
        (batch, seq), device = like.shape[:2], like.device
    else:
        (batch, seq), device = like, None
    return torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq)
