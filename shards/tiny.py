"""Tiny models built from a config and saved in HF format, for tests, the demo and benchmarks.

They go through ``save_pretrained`` and are loaded by the same code as a real hub model; only
their size is different.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.utils import logging as hf_logging
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

__all__ = ["make_tiny_model", "tiny_config"]


def tiny_config(
    family: str = "gpt2",
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    vocab_size: int = 256,
    max_positions: int = 256,
    tie_embeddings: bool | None = None,
) -> PretrainedConfig:
    """A config of ``family`` (gpt2, llama, mistral, qwen2) with every dropout at 0."""
    if family == "gpt2":
        return GPT2Config(
            n_layer=num_layers, n_embd=hidden_size, n_head=num_heads, vocab_size=vocab_size,
            n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            tie_word_embeddings=True if tie_embeddings is None else tie_embeddings,
            bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
        )
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if family not in classes:
        raise ValueError(f"unknown tiny family {family!r}; choose gpt2, {', '.join(classes)}")
    extra = {"sliding_window": None} if family in ("mistral", "qwen2") else {}
    return classes[family](
        num_hidden_layers=num_layers, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads, vocab_size=vocab_size,
        max_position_embeddings=max_positions, attention_dropout=0.0,
        tie_word_embeddings=bool(tie_embeddings), **extra,
    )


def make_tiny_model(
    path: str | Path,
    family: str = "gpt2",
    *,
    max_shard_size: str | None = None,
    seed: int = 0,
    **config_kwargs,
) -> Path:
    """Build a randomly initialised (seeded) tiny model and ``save_pretrained`` it to ``path``."""
    path = Path(path)
    config = tiny_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path, **kwargs)
    finally:
        hf_logging.enable_progress_bar()
    return path
