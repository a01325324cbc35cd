"""Held-out evaluation: the mean token loss (and perplexity) of a model over fixed batches, no step.

``eval_batches`` packs the first documents of a split (read whole, as one shard) into the same
batches every time, so evaluations at different steps compare; ``evaluate`` runs them through any
causal LM that returns ``.loss`` (``SwarmModelForCausalLM`` through the swarm, or a local
transformers model of the same weights) under ``torch.no_grad()``: no gradient, nothing committed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dht.schemas import DatasetSpec
from shards.local import labelled_tokens
from core.errors import ConfigError
from swarm.text import TextCodec
from swarm.text_data import Packer, open_split, shard_texts

__all__ = ["EvalResult", "eval_batches", "evaluate"]


@dataclass(frozen=True)
class EvalResult:
    """Mean loss per predicted token over ``tokens`` tokens, and its perplexity."""

    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))


def eval_batches(spec: DatasetSpec, codec: TextCodec, *, batch_size: int, seq_len: int, batches: int
                 ) -> list[torch.Tensor]:
    """Up to ``batches`` batches of ``[batch_size, seq_len]`` from the start of ``spec``'s split (a
    last, smaller batch when the split runs out); ``ConfigError`` if it holds no sequence at all."""
    packer = Packer(shard_texts(open_split(spec), spec, 0, num_shards=1), codec, seq_len)
    rows: list[list[int]] = []
    while len(rows) < batch_size * batches and (packed := packer.next()) is not None:
        rows.append(packed.tokens)
    if not rows:
        raise ConfigError(f"split {spec.split!r} of {spec.source} holds no sequence of {seq_len} tokens to evaluate on")
    return [torch.tensor(rows[i:i + batch_size], dtype=torch.long) for i in range(0, len(rows), batch_size)]


def evaluate(model: Any, batches: Sequence[torch.Tensor]) -> EvalResult:
    """The mean loss of ``model`` per predicted token over ``batches`` (each row predicts all but its
    first token), weighted by the tokens of each batch."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            count = labelled_tokens(ids)
            total += float(model(ids, labels=ids).loss) * count
            tokens += count
    return EvalResult(loss=total / tokens, tokens=tokens)
