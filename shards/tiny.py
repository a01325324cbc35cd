"""Tiny models built from a config and saved in HF format, for tests, the demo and benchmarks.

They go through ``save_pretrained`` and are loaded by the same code as a real hub model; only
their size is different.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config
from transformers.utils import logging as hf_logging

__all__ = ["make_tiny_model", "tiny_config", "TINY_FAMILIES"]

_LLAMA_STYLE = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
TINY_FAMILIES: tuple[str, ...] = ("gpt2", *_LLAMA_STYLE)


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
    sliding_window: int | None = None,
) -> PretrainedConfig:
    """A config of ``family`` with every dropout at 0 and sdpa attention.

    ``tie_embeddings=None`` keeps the family's usual choice (GPT-2 ties, the others do not).
    ``sliding_window`` applies to mistral (every layer) and qwen2 (the upper half of the layers).
    """
    if family == "gpt2":
        config = GPT2Config(
            n_layer=num_layers, n_embd=hidden_size, n_head=num_heads, vocab_size=vocab_size,
            n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
            tie_word_embeddings=True if tie_embeddings is None else tie_embeddings,
            bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
        )
    elif family in _LLAMA_STYLE:
        config = _LLAMA_STYLE[family](
            num_hidden_layers=num_layers, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
            num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads, vocab_size=vocab_size,
            max_position_embeddings=max_positions, attention_dropout=0.0,
            tie_word_embeddings=bool(tie_embeddings), **_sliding(family, sliding_window, num_layers),
        )
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    config._attn_implementation = "sdpa"
    return config


def make_tiny_model(
    path: str | Path,
    family: str = "gpt2",
    *,
    max_shard_size: str | None = None,
    seed: int = 0,
    **config_kwargs: Any,
) -> Path:
    """Build a randomly initialised tiny model (deterministic in ``seed``, leaving the caller's RNG
    alone) and ``save_pretrained`` it as safetensors to ``path``, sharded if ``max_shard_size``.
    ``config_kwargs`` are those of ``tiny_config``."""
    path = Path(path)
    config = tiny_config(family, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path, **kwargs)
    finally:
        hf_logging.enable_progress_bar()
    return path


def _sliding(family: str, window: int | None, num_layers: int) -> dict[str, object]:
    if family == "qwen2":
        return {"use_sliding_window": window is not None, "sliding_window": window,
                "max_window_layers": num_layers // 2}
    if family == "mistral":
        return {"sliding_window": window}
    return {}
