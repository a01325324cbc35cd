"""Tiny models for tests, the demo and benchmarks: deterministic, dropout-free, any family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shards import make_tiny_model, tiny_config


def test_tiny_model_is_reproducible_and_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = make_tiny_model(tmp_path / "a", "llama", num_layers=1, hidden_size=16, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = make_tiny_model(tmp_path / "b", "llama", num_layers=1, hidden_size=16, seed=3)
    c = make_tiny_model(tmp_path / "c", "llama", num_layers=1, hidden_size=16, seed=4)
    assert isinstance(a, Path)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert not torch.equal(load_file(a / "model.safetensors")["model.embed_tokens.weight"],
                           load_file(c / "model.safetensors")["model.embed_tokens.weight"])


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2"])
def test_tiny_config_has_no_dropout(family):
    config = tiny_config(family, num_layers=2, hidden_size=32, num_kv_heads=2 if family != "gpt2" else None)
    dropouts = {k: v for k, v in config.to_dict().items() if "drop" in k and isinstance(v, float)}
    assert dropouts and not any(dropouts.values())
    assert config.model_type == family


def test_tiny_config_refuses_unknown_family():
    with pytest.raises(ValueError, match="unknown tiny family 'bert'"):
        tiny_config("bert")
