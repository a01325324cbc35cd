"""``shards.export``: a model cut into stages and local parts, renamed back and rebuilt, is the
original model (same logits, the architecture's own tensor names, a tied head kept tied)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from shards.export import build_hf_model, local_checkpoint_names, save_hf_checkpoint, stage_checkpoint_names
from shards.families import family_of
from shards.local import load_local_parts
from shards.source import resolve_model
from shards.stage import load_stage
from core.types import LayerRange
from core.errors import StateMismatch

FAMILIES = {
    "gpt2-tied": dict(family="gpt2", num_layers=3, hidden_size=32, num_heads=4),
    "llama-untied": dict(family="llama", num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2),
    "qwen2-tied": dict(family="qwen2", num_layers=3, hidden_size=32, num_heads=4, tie_embeddings=True),
}
STAGES = [LayerRange(start=0, end=2), LayerRange(start=2, end=3)]


def _parts(model_dir):
    source = resolve_model(str(model_dir))
    family = family_of(source.config)
    tensors = {}
    for layers in STAGES:
        params = {n: p.detach() for n, p in load_stage(source, layers).named_parameters()}
        tensors |= stage_checkpoint_names(family, layers, params)
    local = {n: p.detach() for n, p in load_local_parts(source).named_parameters()}
    return source, tensors | local_checkpoint_names(family, local)


@pytest.mark.parametrize("name", FAMILIES)
def test_rebuilt_model_is_the_original(name, model_factory, tmp_path):
    model_dir = model_factory(**FAMILIES[name])
    source, tensors = _parts(model_dir)
    out = save_hf_checkpoint(source.config, tensors, tmp_path / "out")
    original, rebuilt = AutoModelForCausalLM.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original(ids).logits, rebuilt(ids).logits)
    with safe_open(out / "model.safetensors", "pt") as saved, safe_open(model_dir / "model.safetensors", "pt") as ref:
        assert set(saved.keys()) == set(ref.keys())  # the architecture's names, a tied head stored once
    if original.config.tie_word_embeddings:
        assert rebuilt.get_output_embeddings().weight is rebuilt.get_input_embeddings().weight


def test_missing_or_unknown_tensors_are_named(model_factory):
    model_dir = model_factory(**FAMILIES["gpt2-tied"])
    source, tensors = _parts(model_dir)
    family = family_of(source.config)
    without_stage = {k: v for k, v in tensors.items() if not k.startswith("h.2.")}
    with pytest.raises(StateMismatch, match="no tensor for h.2"):
        build_hf_model(source.config, without_stage)
    with pytest.raises(StateMismatch, match="no parameter for"):
        build_hf_model(source.config, tensors | {"h.7.attn.c_attn.weight": torch.zeros(1)})
    with pytest.raises(StateMismatch, match="shape"):
        build_hf_model(source.config, tensors | {"wte.weight": torch.zeros(3, 3)})
    with pytest.raises(StateMismatch, match="has no parameter 'rotary.x'"):
        stage_checkpoint_names(family, STAGES[0], {"rotary.x": torch.zeros(1)})
    with pytest.raises(StateMismatch, match="has no parameter 'blocks.5.w'"):
        stage_checkpoint_names(family, STAGES[0], {"blocks.5.w": torch.zeros(1)})
    with pytest.raises(StateMismatch, match="local parts have no parameter"):
        local_checkpoint_names(family, {"head.bias": torch.zeros(1)})
