"""shards/: stages and local parts equal the transformers model; only needed tensors are read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from shards import (
    causal_lm_loss,
    load_local_parts,
    load_stage,
    make_tiny_model,
    resolve_model,
    stage_boundaries,
)
from shards.types import LayerRange
from swarm.errors import ModelLoadError, UnsupportedArchitecture

VARIANTS = {
    "gpt2": dict(family="gpt2"),
    "llama-gqa": dict(family="llama", num_kv_heads=2),
    "llama-tied": dict(family="llama", tie_embeddings=True),
    "mistral": dict(family="mistral", num_kv_heads=2),
    "qwen2": dict(family="qwen2"),
}


def _run(local, stages, ids, mask=None):
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    hidden = local.embed(ids, positions)
    for stage in stages:
        hidden = stage(hidden, attention_mask=mask, position_ids=positions)
    return local.head(hidden)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("sharded", [False, True])
def test_stages_equal_the_transformers_model(name, sharded, model_factory):
    model_dir = model_factory(num_layers=3, hidden_size=32, **VARIANTS[name],
                              **({"max_shard_size": "20KB"} if sharded else {}))
    assert (model_dir / "model.safetensors.index.json").exists() == sharded
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    source = resolve_model(str(model_dir))
    local = load_local_parts(source)
    stages = [load_stage(source, layers) for layers in stage_boundaries(3, 2)]
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    expected = reference(ids, attention_mask=mask, labels=ids)
    logits = _run(local, stages, ids, mask)
    assert (logits - expected.logits).abs().max().item() <= 1e-5
    assert abs(causal_lm_loss(logits, ids).item() - expected.loss.item()) <= 1e-5


def test_gradients_equal_the_transformers_model(model_factory):
    model_dir = model_factory(num_layers=2, hidden_size=32, family="llama", num_kv_heads=2)
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    local = load_local_parts(str(model_dir))
    stages = [load_stage(str(model_dir), r) for r in stage_boundaries(2, 2)]
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    reference(ids, labels=ids).loss.backward()
    causal_lm_loss(_run(local, stages, ids), ids).backward()
    ours = dict(stages[1].blocks[0].named_parameters())
    theirs = dict(reference.model.layers[1].named_parameters())
    for name, param in ours.items():
        assert (param.grad - theirs[name].grad).abs().max().item() <= 1e-5, name
    assert (local.embed_tokens.weight.grad - reference.model.embed_tokens.weight.grad).abs().max() <= 1e-5


def test_a_stage_reads_only_its_own_tensors(model_factory):
    model_dir = model_factory(num_layers=4, hidden_size=32, family="llama", max_shard_size="20KB")
    source = resolve_model(str(model_dir))
    stage = load_stage(source, LayerRange(start=2, end=3))
    assert source.loaded_names and all(name.startswith("model.layers.2.") for name in source.loaded_names)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert source.opened_files == {index[name] for name in source.loaded_names}
    assert len(set(index.values())) > len(source.opened_files)
    assert len(stage.blocks) == 1
    own = {name for name in index if name.startswith("model.layers.2.")}
    assert source.loaded_names == own


def test_local_parts_read_only_embeddings_norm_and_head(model_factory):
    model_dir = model_factory(num_layers=2, hidden_size=32, family="gpt2")
    source = resolve_model(str(model_dir))
    load_local_parts(source)
    assert not any(".h." in name or name.startswith("h.") for name in source.loaded_names)
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= source.loaded_names


def test_hub_checkpoint_names_without_prefix_load(model_factory, tmp_path):
    """The hub's own gpt2 checkpoint has keys like ``h.0.attn.c_attn.weight`` (no ``transformer.``)."""
    from safetensors.torch import load_file, save_file

    model_dir = model_factory(num_layers=2, hidden_size=32, family="gpt2")
    renamed = tmp_path / "gpt2-hub-style"
    shutil.copytree(model_dir, renamed)
    tensors = load_file(renamed / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, renamed / "model.safetensors",
              metadata={"format": "pt"})
    ids = torch.randint(0, 256, (1, 6))
    a = _run(load_local_parts(str(model_dir)), [load_stage(str(model_dir), LayerRange(start=0, end=2))], ids)
    b = _run(load_local_parts(str(renamed)), [load_stage(str(renamed), LayerRange(start=0, end=2))], ids)
    assert torch.equal(a, b)


def test_hub_id_resolves_through_the_hf_cache_offline(model_factory, tmp_path, monkeypatch):
    model_dir = model_factory(num_layers=2, hidden_size=32, family="qwen2")
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-qwen2" / "snapshots" / ("a" * 40)
    shutil.copytree(model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    source = resolve_model("tiny-org/tiny-qwen2")
    assert source.root == snapshot
    stage = load_stage(source, LayerRange(start=1, end=2))
    assert source.loaded_names and all(n.startswith("model.layers.1.") for n in source.loaded_names)
    assert stage.layers == LayerRange(start=1, end=2)
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        resolve_model("no-such-org/no-such-model")


@pytest.mark.parametrize(
    "edit, error, words",
    [
        ({"model_type": "bert", "architectures": ["BertForMaskedLM"]}, UnsupportedArchitecture,
         ["'bert'", "BertForMaskedLM", "gpt2", "llama", "mistral", "qwen2"]),
    ],
)
def test_unsupported_architecture_is_named(edit, error, words, model_factory, tmp_path):
    model_dir = tmp_path / "odd"
    shutil.copytree(model_factory(num_layers=2, hidden_size=32), model_dir)
    config = json.loads((model_dir / "config.json").read_text()) | edit
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(error) as caught:
        load_stage(str(model_dir), LayerRange(start=0, end=1))
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize(
    "model, words",
    [("/no/such/dir", "does not exist"), ("./relative/missing", "does not exist")],
)
def test_missing_model_is_a_clear_error(model, words):
    with pytest.raises(ModelLoadError, match=words):
        resolve_model(model)


def test_layers_beyond_the_model_are_refused(model_factory):
    model_dir = model_factory(num_layers=2, hidden_size=32)
    with pytest.raises(ModelLoadError, match=r"layers \[1, 5\) are outside .* 2 layers"):
        load_stage(str(model_dir), LayerRange(start=1, end=5))


def test_directory_without_safetensors_is_refused(tmp_path, model_factory):
    model_dir = tmp_path / "no-weights"
    model_dir.mkdir()
    shutil.copy(model_factory(num_layers=2, hidden_size=32) / "config.json", model_dir)
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_stage(str(model_dir), LayerRange(start=0, end=1))


def test_tiny_model_is_reproducible(tmp_path):
    a = make_tiny_model(tmp_path / "a", "llama", num_layers=1, hidden_size=16, seed=3)
    b = make_tiny_model(tmp_path / "b", "llama", num_layers=1, hidden_size=16, seed=3)
    assert (Path(a) / "model.safetensors").read_bytes() == (Path(b) / "model.safetensors").read_bytes()
