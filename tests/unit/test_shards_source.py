"""Resolving a model: local directories, hub ids through the HF cache (offline), what gets fetched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
from safetensors import safe_open

import shards.source
from shards import LayerRange, ModelSource, load_local_parts, load_stage, resolve_model
from core.errors import ModelLoadError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub_cache(model_dir: Path, cache: Path, repo_id: str) -> Path:
    """Lay ``model_dir`` out as huggingface_hub's cache does: snapshots/<commit>/..., refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF cache under ``HF_HOME`` in offline mode (constants are read at import, so patched too)."""
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_local_directory_resolves(model_factory):
    model_dir = model_factory("llama", num_layers=2, hidden_size=32)
    source = resolve_model(model_dir)
    assert source.name == str(model_dir) and source.root == model_dir
    assert source.config.model_type == "llama" and source.config._attn_implementation == "sdpa"
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        assert sorted(source.tensor_names()) == sorted(f.keys())
    assert resolve_model(source) is source
    assert not source.loaded_names and not source.opened_files


def test_load_reads_exactly_the_named_tensors(model_factory):
    source = resolve_model(str(model_factory("gpt2", num_layers=2, hidden_size=32, max_shard_size="20KB")))
    tensors = source.load(["transformer.h.1.ln_2.weight", "transformer.ln_f.bias"])
    assert set(tensors) == source.loaded_names == {"transformer.h.1.ln_2.weight", "transformer.ln_f.bias"}
    assert tensors["transformer.h.1.ln_2.weight"].shape == (32,)
    with pytest.raises(ModelLoadError, match="has no tensor 'nope'"):
        source.load(["nope"])


def test_config_hash_is_canonical(model_factory, tmp_path):
    model_dir = model_factory("qwen2", num_layers=2, hidden_size=32)
    config = json.loads((model_dir / "config.json").read_text())
    expected = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert resolve_model(model_dir).config_hash == expected
    reformatted = tmp_path / "reformatted"
    shutil.copytree(model_dir, reformatted)
    (reformatted / "config.json").write_text(json.dumps(dict(reversed(config.items())), indent=4))
    assert resolve_model(reformatted).config_hash == expected
    changed = tmp_path / "changed"
    shutil.copytree(model_dir, changed)
    (changed / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-5}))
    assert resolve_model(changed).config_hash != expected


@pytest.mark.parametrize(
    "model, words",
    [
        ("/no/such/dir", "model directory /no/such/dir does not exist"),
        ("./relative/missing", "does not exist"),
        ("../up/and/away", "does not exist"),
        ("a/b/c", "does not exist"),
    ],
)
def test_missing_directory_is_a_clear_error(model, words):
    with pytest.raises(ModelLoadError, match=words) as caught:
        resolve_model(model)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("keep, words", [(["config.json"], "no model.safetensors"), ([], "has no config.json")])
def test_directory_without_weights_or_config_is_refused(keep, words, model_factory, tmp_path):
    model_dir = tmp_path / "partial"
    model_dir.mkdir()
    for name in keep:
        shutil.copy(model_factory("gpt2", num_layers=2, hidden_size=32) / name, model_dir)
    with pytest.raises(ModelLoadError, match=words) as caught:
        resolve_model(str(model_dir))
    assert str(model_dir) in str(caught.value)


@pytest.mark.parametrize("sharded", [False, True])
def test_hub_id_resolves_from_the_offline_cache(sharded, model_factory, offline_cache):
    model_dir = model_factory("qwen2", num_layers=2, hidden_size=32, **({"max_shard_size": "20KB"} if sharded else {}))
    snapshot = _fake_hub_cache(model_dir, offline_cache, "tiny-org/tiny-qwen2")
    source = resolve_model("tiny-org/tiny-qwen2")
    assert source.name == "tiny-org/tiny-qwen2" and source.root == snapshot and source.revision == COMMIT
    assert source.config.model_type == "qwen2"
    stage = load_stage(source, LayerRange(start=1, end=2))
    load_local_parts(source)
    assert stage.layers == LayerRange(start=1, end=2)
    assert not any(name.startswith("model.layers.0.") for name in source.loaded_names)


def test_unknown_hub_id_offline_is_a_one_line_error_naming_it(offline_cache):
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model") as caught:
        resolve_model("no-such-org/no-such-model")
    assert "\n" not in str(caught.value)


def test_hub_cache_without_safetensors_is_refused(model_factory, offline_cache):
    snapshot = _fake_hub_cache(model_factory("gpt2", num_layers=2, hidden_size=32), offline_cache, "org/bin-only")
    (snapshot / "model.safetensors").unlink()
    source = resolve_model("org/bin-only")
    with pytest.raises(ModelLoadError, match="model.safetensors of .org/bin-only."):
        load_stage(source, LayerRange(start=0, end=1))


def test_hub_downloads_config_and_index_first_then_only_needed_shards(model_factory, tmp_path, monkeypatch):
    remote = model_factory("llama", num_layers=4, hidden_size=32, max_shard_size="20KB")
    cache = tmp_path / "cache"
    requested: list[tuple[str, str | None]] = []

    def fake_download(repo_id: str, filename: str, *, revision: str | None = None) -> str:
        requested.append((filename, revision))
        target = cache / "snapshots" / COMMIT / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(remote / filename, target)
        return str(target)

    monkeypatch.setattr(shards.source, "hf_hub_download", fake_download)
    source = resolve_model("org/tiny-llama")
    assert requested == [("config.json", None)]
    stage = load_stage(source, LayerRange(start=3, end=4))
    index = json.loads((remote / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {index[name] for name in index if name.startswith("model.layers.3.")}
    assert requested[1] == ("model.safetensors.index.json", COMMIT)
    assert {name for name, _ in requested[2:]} == needed
    assert all(revision == COMMIT for _, revision in requested[1:])
    assert len(needed) < len(set(index.values()))
    assert len(stage.blocks) == 1


def test_repr_names_the_model(model_factory):
    model_dir = model_factory("gpt2", num_layers=2, hidden_size=32)
    assert repr(ModelSource(str(model_dir), model_dir)).startswith(f"ModelSource({str(model_dir)!r}")
